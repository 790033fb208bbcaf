# Build stage: a compiler for capture's C files (cdc/_wal2json.c, outbox/_append.c), then a wheel.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY common common
COPY cdc cdc
COPY outbox outbox
COPY dispatcher dispatcher
COPY api api
COPY config config
COPY client client
COPY sidecar sidecar
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 ct1
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels && mkdir -p /app/var && chown ct1 /app/var
USER ct1
# Inside a container the API listens on every interface of the container's own network
# (the default elsewhere is loopback only); publish 8080 to reach it.
ENV CT1_API__HOST=0.0.0.0
EXPOSE 8080
ENTRYPOINT ["ct1-cdc", "run"]

# Past one machine ([outbox] backend = "jetstream", docs/jetstream.md), a compose-style
# layout: the same image in every role, one settings file, each node its own volume for
# /app/var (its copy of the events, or capture's copy of its state).
#
#   nats-1, nats-2, nats-3   nats:2.9  -js --cluster_name ct1 --routes nats-route://nats-1:6222,...
#   capture-a, capture-b     this image, command: --role capture    (b waits as a's standby)
#   dispatch-1, -2, -3       this image, command: --role dispatch   (sharing every endpoint)
#   api-1, api-2             this image, command: --role api        (behind one load balancer)
#
# with CT1_OUTBOX__BACKEND=jetstream and
# CT1_OUTBOX__JETSTREAM__SERVERS='["nats://nats-1:4222","nats://nats-2:4222","nats://nats-3:4222"]'.
