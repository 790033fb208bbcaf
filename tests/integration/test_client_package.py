"""The CT2/CT3 client installs on its own: a wheel of client/ holds the package
``ct1_client`` and nothing else (no top-level ``client``, ``api`` or ``config`` in a user's
environment), needs nothing of the sidecar, and verifies a webhook in a bare virtualenv."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=ROOT / "client",
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("ct1_cdc_client-*.whl")
    return wheel


def test_the_client_wheel_holds_only_ct1_client_and_asks_for_its_three_libraries(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ct1_client"}
    (metadata,) = [n for n in names if n.endswith("METADATA")]
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist")
    ]
    assert requires == [
        "Requires-Dist: aiohttp>=3.9",
        "Requires-Dist: httpx>=0.27",
        "Requires-Dist: pydantic>=2.6",
    ]


def test_it_verifies_a_webhook_in_a_virtualenv_without_the_sidecar(tmp_path):
    from dispatcher.signing import generate_secret, headers, secret_key

    wheel = build_wheel(tmp_path / "dist")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:  # what pip would put there (no dependencies)
        archive.extractall(site)
    secret = generate_secret()
    body = b'{"id": 1, "type": "order.created"}'
    hdrs = headers([secret_key(secret)], "evt_1", 1_800_000_000, body, "1")
    script = (
        "import sys, json\n"
        "import ct1_client\n"  # the package itself imports nothing beyond the standard library
        "from ct1_client.webhooks import WebhookVerifier\n"
        f"print(WebhookVerifier({secret!r}).verify({body!r}, {hdrs!r}, now=1_800_000_000)['type'])\n"
        "for name in ('client', 'api', 'config', 'dispatcher', 'cdc'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'{name} is importable')\n"
    )
    done = subprocess.run([str(python), "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "order.created"
