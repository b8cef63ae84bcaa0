# shardmq container image. Build from the repository root:
#
#   docker build -t shardmq .
#
# Running it needs a seccomp profile that allows io_uring (Docker's default
# blocks it since 25.0) and higher ulimits; see README.md (Operating it,
# Docker), tuning/seccomp-io_uring.json and tuning/docker-compose.yml:
#
#   docker run -d --name shardmq \
#     --security-opt seccomp=tuning/seccomp-io_uring.json \
#     --ulimit nofile=1048576:1048576 --ulimit memlock=-1:-1 \
#     --stop-timeout 15 \
#     -p 1883:1883 -p 127.0.0.1:8080:8080 \
#     -v shardmq-data:/var/lib/shardmq shardmq

# The toolchain rust-toolchain.toml pins. Give the full version: the image
# then carries exactly that toolchain.
ARG RUST_VERSION=1.95.0

# ---- build ------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build

# glommio's build script runs `git submodule update` and panics when git is
# missing (it then compiles its bundled liburing with gcc, which the image
# has).
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# rust-toolchain.toml is deliberately not copied: it names the same version
# as the FROM line, plus rustfmt and clippy, which rustup would download
# for nothing. The build uses the image's toolchain.

# Dependencies first, against stub sources, so that a change under src/
# does not rebuild them. The workspace is "." and loadtest/: cargo reads
# both manifests (and the lock file covers both), and it checks that the
# [[bench]] targets exist, hence benches/.
COPY Cargo.toml Cargo.lock ./
COPY .cargo/ .cargo/
COPY loadtest/Cargo.toml loadtest/
COPY benches/ benches/
RUN mkdir -p src loadtest/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > loadtest/src/main.rs \
 && cargo build --release --locked --bin shardmq

# The broker itself. COPY keeps the files' modification times, which may be
# older than the stubs': touch the crate roots so that cargo rebuilds.
COPY src/ src/
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin shardmq \
 && strip --strip-debug -o /shardmq target/release/shardmq
# (The release profile keeps line tables, debug = 1, for profiling; the
# image drops them and keeps the symbols, so backtraces still name
# functions. Copy target/release/shardmq instead to keep them.)

# ---- runtime ----------------------------------------------------------------
# The binary needs only glibc, libm and libgcc_s (ldd), all in
# debian:bookworm-slim, built against the same glibc as rust:*-bookworm.
FROM debian:bookworm-slim

RUN groupadd --system --gid 10001 shardmq \
 && useradd --system --uid 10001 --gid shardmq --no-create-home \
            --home-dir /var/lib/shardmq --shell /usr/sbin/nologin shardmq \
 && install -d -o shardmq -g shardmq -m 0750 /var/lib/shardmq

COPY --from=build /shardmq /usr/local/bin/shardmq

# MQTT: the embedded default already listens on 0.0.0.0:1883. It is not
# set here with SHARDMQ_LISTEN on purpose: that variable, next to a config
# file with [[listeners]] (e.g. TLS only), would add a plain TCP listener.
#
# HTTP (GET /metrics, GET /api/v1/status): the default binds 127.0.0.1:8080,
# unreachable from outside a container, so bind every address. /metrics has
# no authentication; publish it to a trusted network only. The admin API
# (/api/v1/...) without http.api_token (config file only) answers loopback
# clients only: from outside the container it says 403, while the health
# check below, run inside the container, reaches it over loopback. With
# http.api_token set, pass it to the check as SHARDMQ_API_TOKEN.
# An empty SHARDMQ_HTTP turns the HTTP listener off, and the health check
# then fails.
ENV SHARDMQ_HTTP=0.0.0.0:8080

# The logs (sessions, queued and retained messages). Locked while a broker
# runs on it: one container per volume.
VOLUME ["/var/lib/shardmq"]

EXPOSE 1883 8080
# Cluster (when SHARDMQ_NODE_ID is set): membership on UDP 7946 and bridge
# links on TCP 7946 + shard index (one port per shard); see
# tuning/docker-compose.yml.

USER 10001:10001
WORKDIR /var/lib/shardmq

# SIGTERM: the broker closes its listeners, disconnects clients and syncs
# its logs within server.shutdown_timeout_s (10 s): give `docker stop` more
# than that (--stop-timeout 15, compose stop_grace_period).
STOPSIGNAL SIGTERM

# `shardmq ctl status` exits 0 when every shard answers (HTTP 200) and 1
# when the broker is not ready or cannot be reached. --http is given
# explicitly: ctl would otherwise read SHARDMQ_HTTP (0.0.0.0:8080 above).
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/shardmq", "ctl", "--http", "127.0.0.1:8080", "status"]

# Extra arguments to `docker run IMAGE ...` are broker flags (--config,
# --shards, --node-id, ...). Subcommands cannot follow those flags; run
# them as `docker exec CONTAINER shardmq ctl --http 127.0.0.1:8080 status`
# or `docker run --entrypoint shardmq IMAGE check-config FILE`.
ENTRYPOINT ["/usr/local/bin/shardmq", "--data-dir", "/var/lib/shardmq"]
