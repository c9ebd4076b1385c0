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

# distroless/cc: glibc and CA certificates, no shell; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/redis-ambassador /usr/local/bin/redis-ambassador
COPY profiles/staging.toml profiles/prod.toml /etc/redis-ambassador/profiles/
ENV AMBASSADOR_CONFIG_DIR=/etc/redis-ambassador/profiles \
    AMBASSADOR__LISTEN__ADDRESS=0.0.0.0:6379 \
    AMBASSADOR__ADMIN__ADDRESS=0.0.0.0:9121 \
    AMBASSADOR__LOG__FORMAT=json
USER 65532:65532
EXPOSE 6379 9121
# No shell in the image: the binary asks its own admin endpoint.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["/usr/local/bin/redis-ambassador", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/redis-ambassador"]
