# syntax=docker/dockerfile:1
# Build: docker build -t redis-ambassador .
# Run:   docker run --rm -p 6379:6379 -e AMBASSADOR_PROFILE=prod \
#          -v /path/to/secret:/run/secrets/redis-prod:ro redis-ambassador
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The same command .ci/run builds with, so CI notices when this stage would break.
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/redis-ambassador /usr/local/bin/redis-ambassador
COPY profiles/staging.toml profiles/prod.toml /etc/redis-ambassador/profiles/
ENV AMBASSADOR_CONFIG_DIR=/etc/redis-ambassador/profiles \
    AMBASSADOR__LISTEN__ADDRESS=0.0.0.0:6379
USER nonroot:nonroot
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-ambassador"]
