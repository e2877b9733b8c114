# sluice: a slim runtime image. Build: docker build -t sluice .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Concurrency-limiting reverse proxy for OpenAI-compatible APIs"
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice
USER 10001
WORKDIR /var/lib/sluice
# The SQLite store lives on a volume so limits survive container restarts.
VOLUME ["/var/lib/sluice"]
# No admin token here on purpose: listening on 0.0.0.0 without one, sluice refuses to
# start (one line, exit 2). Pass -e SLUICE_SERVER__ADMIN_TOKEN=... (or, knowingly,
# SLUICE_SERVER__ALLOW_OPEN_ADMIN=true).
ENV SLUICE_SERVER__HOST=0.0.0.0 \
    SLUICE_SERVER__PORT=8080 \
    SLUICE_SERVER__DATABASE=/var/lib/sluice/sluice.db \
    SLUICE_SERVER__LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["sluice"]
CMD ["serve"]
