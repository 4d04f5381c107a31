"""A real ComfyUI server on loopback for tests and tools: on the CPU (ComfyUI's default device with
SPARSE_ATOMS_TEST_DEVICE=cuda), every folder in a temporary base directory, this repository
symlinked in as its only custom node package."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = "sparse_atoms"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_path: str, python: str = sys.executable, base: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        """``extra_args``: more ComfyUI command-line options (e.g. ``--bf16-unet``)."""
        self.comfyui_path = os.path.abspath(comfyui_path)
        self.extra_args = list(extra_args)
        self.python = python
        self.base = base or tempfile.mkdtemp(prefix="sparse_atoms_comfy_")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.process = None
        self.log_path = os.path.join(self.base, "server.log")

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        custom = os.path.join(self.base, "custom_nodes")
        os.makedirs(custom, exist_ok=True)
        os.makedirs(os.path.join(self.base, "user"), exist_ok=True)
        link = os.path.join(custom, PACKAGE)
        if not os.path.exists(link):
            os.symlink(REPO, link)
        device = [] if os.environ.get("SPARSE_ATOMS_TEST_DEVICE", "cpu") == "cuda" else ["--cpu"]
        command = [self.python, "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--disable-api-nodes", "--base-directory", self.base,
                   "--database-url", f"sqlite:///{os.path.join(self.base, 'user', 'comfy.db')}",
                   "--log-stdout", *self.extra_args]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui_path, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                # A returning user: no first-run template dialog over the canvas.
                self.post("/settings/Comfy.TutorialCompleted", True)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()

    def log_tail(self, lines: int = 60) -> str:
        with open(self.log_path) as stream:
            return "".join(stream.readlines()[-lines:])

    # -- HTTP ------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The history entry of a finished prompt (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        status, reply = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"POST /prompt refused the graph ({status}): {json.dumps(reply)[:2000]}")
        return self.wait(reply["prompt_id"], timeout)

    @staticmethod
    def messages(entry: dict) -> list[str]:
        return [message[0] for message in entry.get("status", {}).get("messages", [])]
