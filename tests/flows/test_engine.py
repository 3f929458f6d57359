"""The in-process engine on a real Prefect server: a run created Running costs one more API call (its end), and its
history is what a person expects (Running, then Completed)."""

from __future__ import annotations

import uuid

from prefect import flow
from prefect.client.schemas.objects import StateType
from prefect.filesystems import LocalFileSystem

from birdflow.flows.engine import create_running, engine_context, run_in_process


@flow(name="created-running-probe", persist_result=False)
def probe(value: int) -> int:
    return value + 1


def test_a_run_created_running_makes_one_call_and_shows_running_then_completed(prefect_server, tmp_path):
    # with a result storage of its own, as the executor's flows have: else a run asks the server for the default
    storage = LocalFileSystem(basepath=str(tmp_path))
    storage.save("created-running-probe", overwrite=True)
    probe_here = probe.with_options(result_storage=storage)
    key = f"probe-{uuid.uuid4()}"
    with engine_context() as client:
        deployment = client.create_deployment(flow_id=client.create_flow(probe), name="probe")
        flow_run, created = create_running(client, deployment, {"value": 1}, "probe-1", ["probe"], key)
        assert created and flow_run.state is not None and flow_run.state.is_running() and flow_run.run_count == 1

        sent: list[str] = []
        client._client.event_hooks["request"].append(lambda request: sent.append(f"{request.method} {request.url}"))
        final = run_in_process(probe_here, flow_run, created_running=True)
        client._client.event_hooks["request"].clear()
        assert final is not None and final.is_completed() and final.result() == 2
        assert len(sent) == 1 and sent[0].endswith("/set_state"), sent  # the end: no claim, read or update

        # the same key again: the run as it is, not created a second time
        again, created_again = create_running(client, deployment, {"value": 1}, "probe-1", ["probe"], key)
        assert not created_again and again.id == flow_run.id and again.state and again.state.is_completed()
        history = [state.type for state in client.read_flow_run_states(flow_run.id)]
        assert history == [StateType.RUNNING, StateType.COMPLETED]
        assert client.read_flow_run(flow_run.id).deployment_id == deployment
