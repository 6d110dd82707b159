# One image for every role: `llm-loadtest controller`, `agent`, `mock-server`, and the user
# commands. Build from the repository root:
#
#   docker build -t llm-loadtest .
#   docker run --rm -p 50051:50051 -e LLM_LOADTEST_API_KEY -v llm-loadtest:/data llm-loadtest controller
#   docker run --rm -e LLM_LOADTEST_API_KEY llm-loadtest agent --controller HOST:50051
#
# Every flag can be set as an LLM_LOADTEST_* variable (docs/configuration.md); the defaults
# below make the controller listen on all interfaces with its database on the /data volume.
# On all interfaces the controller refuses to start without a key (LLM_LOADTEST_API_KEY, or
# a key created in /data with `llm-loadtest keys create --db /data/runs.db`); see
# docs/security.md, "The listener rule".

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY controller ./controller
COPY agent ./agent
COPY mockserver ./mockserver
COPY client ./client
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home llmloadtest
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    LLM_LOADTEST_LISTEN=0.0.0.0:50051 \
    LLM_LOADTEST_DB=/data/runs.db
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
# 50051: the controller's gRPC API; 9464: the controller's Prometheus metrics, 9465: an agent's
# (both off unless --metrics-listen / LLM_LOADTEST_METRICS_LISTEN is set); 8000: mock-server.
EXPOSE 50051 9464 9465 8000
# gRPC health: the controller checks itself; an agent (LLM_LOADTEST_CONTROLLER set) checks
# that its controller is serving. Disable it for the mock server (compose does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["llm-loadtest", "health", "--timeout", "3"]
ENTRYPOINT ["llm-loadtest"]
CMD ["controller"]
