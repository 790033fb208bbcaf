FROM python:3.11-slim
RUN useradd --create-home --uid 10001 ct1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cdc cdc
COPY outbox outbox
COPY dispatcher dispatcher
COPY api api
COPY config config
COPY client client
RUN pip install --no-cache-dir . && mkdir -p /app/var && chown ct1 /app/var
USER ct1
# Inside a container the API listens on every interface of the container's own network
# (the default elsewhere is loopback only); publish 8080 to reach it.
ENV CT1_API__HOST=0.0.0.0
EXPOSE 8080
ENTRYPOINT ["ct1-cdc", "run"]
