"""``make ui``: click through the example DAGs in the Airflow UI, against the local Batch API server.

Starts the local Batch API server (state kept in .airflow/server-state, so batches survive a restart) and
``airflow standalone`` (scheduler, triggerer, API server with the UI) on SQLite in .airflow/, with the
connection ``synth_openai_default`` pointing at the server. Open http://localhost:8080 (the admin password is
printed by Airflow and stored in .airflow/simple_auth_manager_passwords.json.generated). Ctrl-C stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from quickstart import BIN, HOME, airflow_env, start_server


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop both children on SIGTERM too, not only Ctrl-C
    HOME.mkdir(exist_ok=True)
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=airflow_env(), check=True, capture_output=True)
    server, port = start_server()
    print(f"local Batch API server on http://127.0.0.1:{port}/v1 (answers are stand-ins, not a model)")
    env = airflow_env(port)
    env["SYNTH_POLL_INTERVAL"] = "5"
    airflow = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=env, start_new_session=True)
    print("airflow standalone starting: open http://localhost:8080 and trigger synth_quickstart "
          "(Ctrl-C to stop)", flush=True)
    try:
        while airflow.poll() is None and server.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (airflow, server):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
