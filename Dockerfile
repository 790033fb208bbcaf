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
ENTRYPOINT ["ct1-cdc", "run"]
