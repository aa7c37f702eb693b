# The nixery server with Nix, for App Engine flex (custom runtime) or any container host.
#
# Base images are build arguments, so the image can be built from local images where no registry
# is reachable (scripts/docker-image does that). The image serves the package set copied from the
# build context (PKGS: nix/offline-pkgs, a demo that needs no network) unless it is run with
# NIXERY_PKGS_PATH="" and NIXERY_CHANNEL or NIXERY_PKGS_REPO (app.yaml follows nixos-unstable).
#
# The runtime is Debian 13 (trixie) for its Nix 2.26: nixpkgs refuses to evaluate under a Nix older
# than 2.18 (its lib/minver.nix), such as Debian 12's 2.8. The server, built on Debian 12, runs on
# Debian 13's newer glibc.
ARG BUILDER_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:trixie-slim

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
# The whole context (.dockerignore leaves out target/ and .git/): a context made with
# `cargo vendor` (vendor/ and .cargo/config.toml, as scripts/docker-image makes it) builds offline.
COPY . .
RUN cargo build --release --locked && strip target/release/nixery

FROM ${RUNTIME_IMAGE}
# Nix builds the images; busybox-static is what the offline package set is made of; git for git
# package sources; ca-certificates for Cloud Storage, channels and the Nix binary cache.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nix-bin busybox-static git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /etc/nix /var/lib/nixery \
 # Nix's build users, which Debian 13's nix-bin leaves to systemd-sysusers: builds run as them,
 # never as the server's root. The server asks for the sandbox itself and, where the container
 # cannot give it (Docker's default seccomp profile refuses the namespaces), says so at start-up
 # and builds as build users alone.
 && (getent group nixbld >/dev/null || groupadd --system nixbld) \
 && for i in 1 2 3 4 5 6 7 8; do \
      id "nixbld$i" >/dev/null 2>&1 \
        || useradd --system --gid nixbld --groups nixbld --no-create-home --home-dir /var/empty \
             --shell /usr/sbin/nologin --comment "Nix build user $i" "nixbld$i"; \
    done \
 && printf 'sandbox = false\n' > /etc/nix/nix.conf
ARG PKGS=nix/offline-pkgs
COPY ${PKGS} /opt/nixery/pkgs
COPY --from=builder /src/target/release/nixery /usr/local/bin/nixery
ENV PORT=8080 \
    NIXERY_PKGS_PATH=/opt/nixery/pkgs \
    STORAGE_PATH=/var/lib/nixery \
    RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/nixery"]
