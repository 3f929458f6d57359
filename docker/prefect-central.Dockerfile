# Prefect's server for the central side on Kubernetes (deployments/kubernetes/prefect.yaml): Prefect's own image with
# prefect-redis, which carries messages between its API processes and background services, installed here once and
# pinned by hash, so that no pod installs anything when it starts (a registry outage or a changed release cannot
# reach the central server at its next restart).
#   docker build -f docker/prefect-central.Dockerfile -t <your registry>/birdflow-prefect-central:3.9.1 .
FROM prefecthq/prefect:3.9.1-python3.11
COPY docker/prefect-central-requirements.txt /tmp/prefect-central-requirements.txt
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/prefect-central-requirements.txt \
    && rm /tmp/prefect-central-requirements.txt
USER 1000
