"""birdflow: listener audio -> one Prefect flow run per recording -> BirdNET -> Arrow detections -> archive."""
