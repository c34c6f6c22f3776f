# One image for every Joey service; the command picks the service (`joey serve <name>`).
#
#   docker build -t joey .
#   docker run --rm joey serve engine
#
# The build stage turns the source tree into a wheel so the runtime image holds only the
# installed package, not the sources or build tools.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    JOEY_ARTIFACT_DIR=/data/artifacts \
    JOEY_CACHE_DIR=/cache
# EXTRAS=frameworks adds what the registry converts native models with (docs/models.md): large (torch).
ARG EXTRAS=""
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/*.whl)${EXTRAS:+[$EXTRAS]}" && rm -rf /wheels

# Own the data directories before switching user: a fresh named volume mounted on them
# inherits this ownership, so the non-root services can write there.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/joey joey \
    && mkdir -p /data/artifacts /data/orchestrator /cache \
    && chown -R joey:joey /data /cache
USER joey
WORKDIR /home/joey

# The registry's gRPC port; the gateway's Open Inference Protocol REST and gRPC ports.
EXPOSE 50051 8080 8081
# Run it under an init (`docker run --init`; compose.yaml sets `init: true`): a service as PID 1 never
# reaps the orphaned grandchildren of conversions and tasks.
ENTRYPOINT ["joey"]
CMD ["serve", "registry"]
