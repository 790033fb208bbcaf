# Sourced by scripts/demo and scripts/test: makes a fresh Debian machine ready.
#  - Debian packages: a PostgreSQL server and its wal2json plugin, nats-server (for the
#    JetStream backend's tests), when missing; a C
#    compiler and Python's headers for capture's compiled decoder
#  - a virtualenv in .venv with ct1-cdc and its test dependencies, refreshed when
#    pyproject.toml, setup.py or the compiled decoder's source changes
# Nothing here downloads anything but Debian and Python packages.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "ct1-cdc: need root (or sudo) to run: $*" >&2; return 1; fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        echo "==> apt-get update" >&2
        as_root apt-get update -qq >&2
        apt_updated=1
    fi
    echo "==> apt-get install $*" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

pg_major() {
    ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sed -E 's#.*/postgresql/([0-9]+)/bin/initdb#\1#' | sort -n | tail -n 1
}

ensure_debian_packages() {
    local major
    major=$(pg_major)
    if [ -z "$major" ]; then
        apt_install postgresql
        major=$(pg_major)
    fi
    if [ ! -f "/usr/lib/postgresql/$major/lib/wal2json.so" ]; then
        apt_install "postgresql-$major-wal2json"
    fi
    # the tests make a certificate for a TLS receiver
    command -v openssl >/dev/null || apt_install openssl
    # the JetStream backend's tests start a three-node cluster of their own
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
}

# A C compiler and Python's headers build cdc/_wal2json.c, capture's compiled decoder
# (without them the install still works, and capture decodes in Python, ~4x slower).
ensure_compiler() {
    local py=${PYTHON:-python3} include
    if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
        apt_install gcc libc6-dev || echo "ct1-cdc: no C compiler: capture will decode in Python" >&2
    fi
    include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    if [ ! -f "$include/Python.h" ]; then
        apt_install python3-dev || echo "ct1-cdc: no Python headers: capture will decode in Python" >&2
    fi
}

ensure_venv() {
    local py=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv" >&2
        "$py" -m venv .venv || { apt_install python3-venv && "$py" -m venv .venv; }
    fi
    local stamp=.venv/.ct1-installed
    local want
    want=$(cat pyproject.toml setup.py cdc/_wal2json.c cdc/_frames.c outbox/_append.c | sha256sum | cut -d' ' -f1)  # the build's inputs
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing ct1-cdc and its dependencies into .venv" >&2
        .venv/bin/python -m pip install -q --upgrade pip >&2
        .venv/bin/python -m pip install -q -e ".[test]" >&2
        echo "$want" > "$stamp"
    fi
}

ensure_debian_packages
ensure_compiler
ensure_venv
