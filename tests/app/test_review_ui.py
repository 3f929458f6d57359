"""A review in the Prefect UI, as a person gives it: `birdflow up`, a recording whose species is new to the station,
the review run it opens (suspended: no process waits), its page opened in headless Chromium, the Resume form filled
and submitted, and the verdict stored. A species the model does not know is asked for again on the same run."""

from __future__ import annotations

import json
import time

from birdflow_tools.stack import Stack
from tests.browser import Page

REVIEW_RUNS = {"flows": {"name": {"any_": ["review-detection"]}}}


def wait_for(check, timeout_s: float, what: str, stack: Stack):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            runs = [
                (run["state_name"], run["state"]["state_details"].get("pause_key"))
                for run in stack.api("flow_runs/filter", REVIEW_RUNS)
            ]
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s; review runs {runs}\n{stack.log_tail()}")
        time.sleep(0.5)
    return result


def suspended_review(stack: Stack, form: int):
    """The review run once it waits for its `form`-th form (its suspension's key says which)."""
    for run in stack.api("flow_runs/filter", REVIEW_RUNS):
        if run["state_name"] == "Suspended" and run["state"]["state_details"]["pause_key"] == f"verdict-{form}":
            return run
    return None


def field(label: str) -> str:
    """The form's property whose label starts with `label` (Prefect's schema form)."""
    return (
        "[...document.querySelectorAll('.p-modal .schema-form-property')]"
        f".find(p => p.querySelector('.schema-form-property__label').innerText.startsWith('{label}'))"
    )


def button(text: str, within: str = "document") -> str:
    return f"[...{within}.querySelectorAll('button')].find(b => b.innerText.trim() === '{text}')"


def fill_form(page: Page, verdict: str, texts: dict[str, str]) -> None:
    """Choose the verdict and type the texts, until the form holds them a moment later: the UI may still be
    setting the form's initial values when it first shows it."""
    choose = (
        f"(() => {{ const choice = {field('Verdict')}.querySelector('select'); choice.value = '{verdict}';"
        " for (const kind of ['input', 'change']) choice.dispatchEvent(new Event(kind, {bubbles: true})); })()"
    )
    held = " && ".join(
        [f"{field('Verdict')}.querySelector('select').value === '{verdict}'"]
        + [f"{field(label)}.querySelector('textarea').value === {text!r}" for label, text in texts.items()]
    )
    for _ in range(10):
        page.evaluate(choose)
        for label, text in texts.items():
            page.evaluate(f"{field(label)}.querySelector('textarea').select()")  # typing replaces what is there
            page.type_text(text)
        time.sleep(0.5)
        if page.evaluate(held):
            return
    raise AssertionError("the review form did not keep what was typed into it")


def give_verdict(page: Page, run_url: str, verdict: str, species: str, reviewer: str) -> str:
    """Open the run, press Resume, fill the form, submit; returns what the form's description said."""
    page.open(run_url)
    page.wait_for("!!" + button("Resume"))
    page.evaluate(button("Resume") + ".click()")
    page.wait_for(f"!!{field('Reviewer')}")
    described = page.evaluate("document.querySelector('.p-modal .markdown-renderer').innerText")
    fill_form(page, verdict, {"Relabel": species, "Reviewer": reviewer})
    page.evaluate(button("Submit", "document.querySelector('.p-modal')") + ".click()")
    page.wait_for("!document.querySelector('.p-modal')")
    return described


def test_a_rare_species_is_reviewed_in_the_prefect_ui(tmp_path, sample_48k):
    stack = Stack(tmp_path, station_id="review", settings={"clip_min_confidence": 0.1})
    page = None
    try:
        stack.start()
        stack.upload("mic1_20250601T053000Z.wav", sample_48k.read_bytes())
        run = wait_for(lambda: suspended_review(stack, 0), 120, "the review run", stack)
        assert run["name"] == "review American Goldfinch mic1 2025-06-01 05:30:03"
        [artifact] = stack.api("artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        assert artifact["type"] == "markdown" and "![spectrogram](data:image/png;base64," in artifact["data"]
        waiting = json.loads(stack.cli("review", "list", "--format", "json").stdout)
        assert [(row["species"], row["asked as"]) for row in waiting] == [("American Goldfinch", "rare")]

        page = Page(tmp_path / "browser")
        run_url = f"http://127.0.0.1:{stack.prefect_port}/runs/flow-run/{run['id']}"
        page.open(run_url)
        page.wait_for("!!" + button("Resume"))
        page.evaluate(button("Resume") + ".click()")
        # the clip's spectrogram, drawn by the browser from the form's description, and its audio linked
        assert (
            page.wait_for(
                "(() => { const image = document.querySelector('.p-modal img');"
                " return image && image.complete && image.naturalWidth; })()"
            )
            > 100
        )
        assert page.evaluate("document.querySelector('.p-modal a').innerText") == "Listen to the clip (FLAC)"
        page.screenshot(tmp_path / "review-form.png")

        described = give_verdict(page, run_url, "relabel", "Pine Siskn", "ada")
        assert "American Goldfinch (Spinus tristis)" in described and waiting[0]["id"] in described
        again = wait_for(lambda: suspended_review(stack, 1), 60, "the form asked again", stack)
        assert again["id"] == run["id"]
        described = give_verdict(page, run_url, "relabel", "Pine Siskin", "ada")
        assert "Not taken: 'Pine Siskn' is no species of the model (did you mean 'Pine Siskin'?)" in described

        def finished():
            [state] = [item["state_type"] for item in stack.api("flow_runs/filter", REVIEW_RUNS)]
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        assert wait_for(finished, 60, "the review run's end", stack) == "COMPLETED"
        stored = stack.cli("sql", "--format", "json", "SELECT * FROM reviews")
        [review] = json.loads(stored.stdout)
        assert (review["verdict"], review["reviewed_common_name"], review["reviewer"], review["via"]) == (
            "relabelled",
            "Pine Siskin",
            "ada",
            "ui",
        )
        assert (review["common_name"], review["detection_id"]) == ("American Goldfinch", waiting[0]["id"])
        assert json.loads(stack.cli("review", "list", "--format", "json").stdout) == []
    finally:
        if page is not None:
            page.close()
        stack.stop()
