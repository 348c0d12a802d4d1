"""Take the README's screenshots from the commands the README documents (a maintainers' tool).

    python tests/screenshots.py            # writes docs/screenshots/ch05-app.png, ch06-app.png, ch07-app.png

In a temporary copy of the checkout (its tracked files, so nothing in yours changes), from its
root as a reader would: train each chapter's quick model with the README's command (`python -m ch05.gpt_train --quick`, `python -m ch06.gpt_class_finetune --quick`,
`python -m ch07.gpt_instruction_finetuning --quick`), start the chapter's page with its documented
command (`python -m ch05.ui`, ... on a free port), use it in a headless Chromium (Debian's
`chromium`, through Playwright) and save the page. The pages show the model paths the reader
sees (`outputs/...`), and the quick models' text: they have read one short story, so they write
nonsense (the README's captions say so).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from webapp import CHROMIUM, chromium, free_port, open_page

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"

TRAIN = {
    "ch05": ["ch05.gpt_train", "--quick"],
    "ch06": ["ch06.gpt_class_finetune", "--quick"],
    "ch07": ["ch07.gpt_instruction_finetuning", "--quick"],
}
SPAM = "You are a winner! You have been specially selected to receive $1000 cash or a $2000 award."


def copy_checkout(dest: Path) -> Path:
    """The repository's tracked files (committed or not), copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_module(args: list[str], cwd: Path, env: dict) -> None:
    print("$ python -m", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, check=True)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the page's command exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listened on port {port} within {timeout:.0f} s")


def settled(page, selector: str, prop: str, quiet_s: float = 2.0, timeout_s: float = 120.0) -> str:
    """The element's text once it is non-empty and has not changed for `quiet_s` (streaming ended)."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        now = page.eval_on_selector(selector, f"el => el.{prop}") if page.query_selector(selector) else ""
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.2)
    raise TimeoutError(f"{selector} did not settle")


def use_page(chapter: str, page) -> None:
    if chapter == "ch05":
        page.click("#generate")
        settled(page, "#output textarea", "value")
    elif chapter == "ch06":
        page.fill("#text textarea", SPAM)
        page.click("#classify")
        settled(page, "#verdict", "innerText")
    else:
        page.fill("#prompt textarea", "Rewrite the sentence using a simile: The car is very fast.")
        page.click("#send")
        settled(page, "#chat .bot .message-content", "textContent")


def main() -> int:
    if CHROMIUM is None:
        print("error: needs Debian's chromium package (apt-get install chromium)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmfs-screens-") as tmp, chromium() as browser:
        work = copy_checkout(Path(tmp) / "LLMs-from-scratch-companion")
        env = {**os.environ, "PYTHONPATH": str(work)}
        env.pop("LLMFS_OUTPUT_DIR", None)  # the documented default: outputs/ in the checkout
        for chapter, train in TRAIN.items():
            run_module(train, work, env)
            port = free_port()
            print(f"$ python -m {chapter}.ui --port {port}", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", f"{chapter}.ui", "--port", str(port)], cwd=work, env=env)
            try:
                wait_for_port(port, proc)
                with open_page(browser, f"http://127.0.0.1:{port}/") as page:
                    use_page(chapter, page)
                    page.screenshot(path=str(OUT / f"{chapter}-app.png"), full_page=True)
                print(f"saved {(OUT / f'{chapter}-app.png').relative_to(REPO)}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
