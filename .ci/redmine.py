#!/usr/bin/env python3
"""Install, configure and start a local Redmine for the Redmine tests.

    python3 .ci/redmine.py           set up and start Redmine (idempotent)
    python3 .ci/redmine.py --stop    stop the server this script started
    python3 .ci/redmine.py --reset   stop it and delete its instance and state file

Redmine comes from the Debian packages `redmine`, `redmine-sqlite` and
`ruby-webrick`, so no gem is downloaded. The script runs its own Redmine
instance in Debian's multi-instance layout (MDR_REDMINE_INSTANCE, default
"mdrtest") with its own SQLite database, so the package's "default" instance
stays untouched.
WEBrick listens on 127.0.0.1 only, on REDMINE_PORT (default 3380).

The users, API keys, project and custom field ids go to a JSON file that the
tests read: REDMINE_STATE, default /tmp/mdr-connector-redmine/state.json, mode
0600. When the server already accepts the service user's key from that file,
the script returns at once.

Setting up needs root, because it installs packages and writes below
/usr/share/redmine and /var/lib/redmine. Without root the script runs itself
again through passwordless sudo when that is available. Redmine itself runs
as www-data. /usr/share/redmine/Gemfile.local serves every instance, so
--reset keeps it.
Only the Python standard library is used, so it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACKAGES = ("redmine", "redmine-sqlite", "ruby-webrick")
REDMINE_ROOT = Path("/usr/share/redmine")
GEMFILE_LOCAL = REDMINE_ROOT / "Gemfile.local"
GEMFILE_LOCAL_TEXT = '# Written by mdr-connector .ci/redmine.py: serve Redmine with WEBrick.\ngem "webrick"\n'
INSTANCE = os.environ.get("MDR_REDMINE_INSTANCE") or "mdrtest"
INSTANCE_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
INSTANCE_DIR = Path("/var/lib/redmine") / INSTANCE
DATABASE = INSTANCE_DIR / "db" / "redmine.sqlite3"
PID_FILE = INSTANCE_DIR / "tmp" / "pids" / "server.pid"
RUN_AS = "www-data"
SETUP_SCRIPT = Path(__file__).resolve().parent / "redmine_setup.rb"

DEFAULT_PORT = 3380
DEFAULT_STATE = "/tmp/mdr-connector-redmine/state.json"
STATE_MARKER = "MDR_REDMINE_STATE "
START_TIMEOUT_S = 180.0

# The package's postinst prompts for dbconfig-common settings. Preseeding them
# keeps the default instance on SQLite even when a MySQL or PostgreSQL client
# is installed.
DEBCONF_PRESEED = """\
redmine redmine/instances/default/dbconfig-install boolean true
redmine redmine/instances/default/database-type select sqlite3
"""


def say(message: str) -> None:
    print(f"redmine.py: {message}", flush=True)


def state_path() -> Path:
    return Path(os.environ.get("REDMINE_STATE") or DEFAULT_STATE)


def server_port() -> int:
    return int(os.environ.get("REDMINE_PORT") or DEFAULT_PORT)


def base_url() -> str:
    return f"http://127.0.0.1:{server_port()}"


def get_status(url: str, api_key: str | None = None, timeout: float = 5.0) -> int | None:
    """Return the HTTP status of GET url, or None when the connection fails."""
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("X-Redmine-API-Key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def read_state() -> dict | None:
    try:
        return json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None


def state_is_live() -> bool:
    state = read_state()
    if not state or state.get("url") != base_url() or state.get("instance") != INSTANCE:
        return False
    return get_status(f"{state['url']}/users/current.json", state["service_user"]["api_key"]) == 200


# --- install -----------------------------------------------------------------


def packages_installed() -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status}\n", *PACKAGES],
        capture_output=True,
        text=True,
    )
    lines = result.stdout.split()
    return result.returncode == 0 and lines == ["installed"] * len(PACKAGES)


def install_packages() -> None:
    if packages_installed():
        return

    if shutil.which("apt-get") is None:
        raise SystemExit(f"redmine.py: apt-get not found; install {' '.join(PACKAGES)} from Debian 12 packages by hand")

    started = time.monotonic()
    say(f"installing {' '.join(PACKAGES)} with apt-get")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["debconf-set-selections"], input=DEBCONF_PRESEED, text=True, check=True)
    subprocess.run(["apt-get", "update", "-q"], env=environment, check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        env=environment,
        check=True,
    )
    say(f"packages installed in {time.monotonic() - started:.0f} s")


# --- instance ----------------------------------------------------------------


def write_file(path: Path, text: str, mode: int) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.write_text(text)
    path.chmod(mode)


def create_instance() -> None:
    """Create the instance directories, database.yml and secret key once."""
    write_file(GEMFILE_LOCAL, GEMFILE_LOCAL_TEXT, 0o644)

    for name in ("config", "db", "files", "log", "public/plugin_assets", "tmp/pids", "tmp/cache", "tmp/sockets"):
        (INSTANCE_DIR / name).mkdir(parents=True, exist_ok=True)

    config = INSTANCE_DIR / "config"
    database_yml = f"production:\n  adapter: sqlite3\n  database: {DATABASE}\n  encoding: utf8\n  timeout: 30000\n"
    write_file(config / "database.yml", database_yml, 0o640)
    secret = config / "secret_key.txt"
    if not secret.exists():
        write_file(secret, secrets.token_hex(64) + "\n", 0o640)

    # Debian looks up instances under /usr/share/redmine/instances, a link to
    # /var/lib/redmine, so INSTANCE_DIR is found without another link.
    subprocess.run(["chown", "-R", f"{RUN_AS}:{RUN_AS}", str(INSTANCE_DIR)], check=True)


def redmine_command(*args: str) -> list[str]:
    """Build a command that runs in the instance as RUN_AS with RAILS_ENV=production."""
    environment = [
        f"REDMINE_INSTANCE={INSTANCE}",
        "RAILS_ENV=production",
        f"HOME={INSTANCE_DIR / 'tmp'}",
    ]
    return ["runuser", "-u", RUN_AS, "--", "env", *environment, *args]


def run_redmine(*args: str, stdin: str | None = None, attempts: int = 1) -> str:
    """Run a command in the instance; with `attempts` above 1, run it again after SQLite's "database is locked"."""
    for attempt in range(1, attempts + 1):
        result = subprocess.run(
            redmine_command(*args),
            cwd=REDMINE_ROOT,
            input=stdin,
            capture_output=True,
            text=True,
        )
        locked = "database is locked" in result.stdout + result.stderr
        if result.returncode == 0 or not locked or attempt == attempts:
            break
        say(f"{' '.join(args[:3])}: the SQLite database was locked, trying again ({attempt} of {attempts})")
        time.sleep(2 * attempt)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"redmine.py: {' '.join(args)} failed with exit code {result.returncode}")
    return result.stdout


def migrate_database() -> None:
    started = time.monotonic()
    # SCHEMA=/dev/null as in Debian's postinst: db/schema.rb sits in the
    # read-only package tree, and the dump after migrating would fail.
    run_redmine("rake", "db:migrate", "SCHEMA=/dev/null")
    run_redmine("rake", "redmine:load_default_data", "REDMINE_LANG=en")
    say(f"database migrated and default data loaded in {time.monotonic() - started:.0f} s")


# --- server ------------------------------------------------------------------


def server_pid() -> int | None:
    """Return the pid of the server this script started, or None when it is not running.

    The pid counts only while its command line names PID_FILE, so a reused
    pid of another program is never signalled.
    """
    try:
        pid = int(PID_FILE.read_text().strip())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if str(PID_FILE).encode() not in command_line.split(b"\0"):
        return None
    return pid


def start_server(log_file: Path) -> subprocess.Popen | None:
    """Start WEBrick in its own session; return None when our server already runs."""
    answers = get_status(f"{base_url()}/") is not None
    pid = server_pid()
    if answers and pid is not None:
        return None
    if answers:
        raise SystemExit(
            f"redmine.py: port {server_port()} is taken by another program; set REDMINE_PORT to a free port"
        )
    if pid is not None:
        # Our server runs but does not respond on this port, because it was
        # started with another REDMINE_PORT or hangs. One server per instance.
        stop_server()

    say(f"starting WEBrick on {base_url()}, log in {log_file}")
    PID_FILE.unlink(missing_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            # rackup, unlike `rails server`, does not try to create tmp/ in
            # the read-only package tree.
            redmine_command(
                "rackup", "--server", "webrick", "--env", "production",
                "--host", "127.0.0.1", "--port", str(server_port()), "--pid", str(PID_FILE),
                "config.ru",
            ),
            cwd=REDMINE_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_server(server: subprocess.Popen | None, log_file: Path) -> None:
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"redmine.py: the Redmine server exited with code {server.returncode}; see {log_file}")
        if get_status(f"{base_url()}/", timeout=2.0) is not None:
            say(f"Redmine responds at {base_url()} after {time.monotonic() - started:.0f} s")
            return
        time.sleep(0.5)
    raise SystemExit(
        f"redmine.py: Redmine did not respond at {base_url()} within {START_TIMEOUT_S:.0f} s; see {log_file}"
    )


def stop_server() -> None:
    pid = server_pid()
    if pid is None:
        say("no server started by this script is running")
        return

    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server_pid() == pid:
        time.sleep(0.2)
    if server_pid() == pid:
        raise SystemExit(f"redmine.py: the Redmine server (pid {pid}) did not stop within 30 s of SIGTERM")
    say(f"stopped the Redmine server (pid {pid})")


# --- configuration -------------------------------------------------------------


def configure_redmine() -> dict:
    """Run redmine_setup.rb through `rails runner` and return what it printed."""
    started = time.monotonic()
    # The script finds or creates every record, so running it again after a lock error is safe.
    output = run_redmine("ruby", "bin/rails", "runner", "eval($stdin.read)", stdin=SETUP_SCRIPT.read_text(), attempts=3)
    for line in output.splitlines():
        if line.startswith(STATE_MARKER):
            say(f"users, project and custom field configured in {time.monotonic() - started:.0f} s")
            return json.loads(line[len(STATE_MARKER):])
    raise SystemExit("redmine.py: the setup script printed no state line")


def write_state(state: dict, owns_directory: bool) -> None:
    """Write the state file; owns_directory tells whether this run created its directory."""
    path = state_path()
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(state, file, indent=2)
        file.write("\n")
    temporary.replace(path)

    # Under sudo, let the calling user's tests read the file.
    if os.environ.get("SUDO_UID") and os.environ.get("SUDO_GID"):
        owner = (int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"]))
        if owns_directory:
            os.chown(path.parent, *owner)
        os.chown(path, *owner)
    say(f"state written to {path}")


def rerun_with_sudo() -> None:
    """Run this script again as root through passwordless sudo, as CI runners offer, or exit."""
    sudo = shutil.which("sudo")
    if sudo is None or subprocess.run([sudo, "-n", "true"], capture_output=True).returncode != 0:
        raise SystemExit("redmine.py: setting up Redmine needs root; run `sudo python3 .ci/redmine.py`")

    say("setting up Redmine needs root, running again with sudo")
    preserved = "REDMINE_PORT,REDMINE_STATE,MDR_REDMINE_INSTANCE,CI"
    command = [sudo, "-n", f"--preserve-env={preserved}", sys.executable, str(Path(__file__).resolve())]
    raise SystemExit(subprocess.run(command).returncode)


def set_up() -> None:
    if state_is_live():
        say(f"Redmine already runs at {base_url()} with the state in {state_path()}")
        return
    if os.geteuid() != 0:
        rerun_with_sudo()

    started = time.monotonic()
    install_packages()
    create_instance()
    migrate_database()

    state_directory = state_path().parent
    owns_directory = not state_directory.exists()
    state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_file = state_directory / "server.log"
    # The set-up script runs before the server starts: a server booting on a
    # busy machine can hold the SQLite database longer than its busy timeout.
    settings = configure_redmine()
    server = start_server(log_file)
    wait_for_server(server, log_file)

    state = {
        "url": base_url(),
        "port": server_port(),
        "instance": INSTANCE,
        "instance_dir": str(INSTANCE_DIR),
        "database": str(DATABASE),
        "server_log": str(log_file),
        "pid_file": str(PID_FILE),
        **settings,
    }
    write_state(state, owns_directory)
    if not state_is_live():
        raise SystemExit("redmine.py: Redmine responds, but rejects the service user's API key")
    say(f"Redmine ready in {time.monotonic() - started:.0f} s")


def reset() -> None:
    stop_server()
    if INSTANCE_DIR.exists():
        shutil.rmtree(INSTANCE_DIR)
        say(f"deleted {INSTANCE_DIR}")
    for path in (state_path(), state_path().parent / "server.log"):
        if path.exists():
            path.unlink()
            say(f"deleted {path}")


def main() -> None:
    if not INSTANCE_NAME_PATTERN.fullmatch(INSTANCE) or INSTANCE == "default":
        raise SystemExit(
            f"redmine.py: invalid MDR_REDMINE_INSTANCE {INSTANCE!r}; use lowercase letters, digits, '-' or '_', "
            "not the package's 'default' instance"
        )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--stop", action="store_true", help="stop the server this script started")
    action.add_argument("--reset", action="store_true", help="stop the server, delete its instance and the state file")
    arguments = parser.parse_args()

    if arguments.stop:
        stop_server()
    elif arguments.reset:
        reset()
    else:
        set_up()


if __name__ == "__main__":
    main()
