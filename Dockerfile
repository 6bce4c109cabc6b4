# imhost in a container: the server, and the plugins we ship built for
# wasm32-wasip2 as defaults. Mount your own plugin directory at /plugins to
# replace them (hot-reloaded; see docs/plugins.md).
#
#   docker build -t imhost .
#   docker run -p 6001:6001 -e IMHOST_API_KEY=... imhost
#
# Stage 1: build the server and the shipped plugins.
FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p imhost \
 && cargo build --release --locked --target wasm32-wasip2 \
      --manifest-path plugins/Cargo.toml --target-dir target/plugins \
 && mkdir -p /out/plugins \
 && for p in word-filter rate-limit welcome; do \
      cp "target/plugins/wasm32-wasip2/release/$(echo $p | tr - _).wasm" "/out/plugins/$p.wasm"; \
      cp "plugins/$p/$p.toml" "/out/plugins/$p.toml"; \
    done

# Stage 2: a small runtime image, running as a user without privileges.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/imhost --create-home imhost
COPY --from=build /src/target/release/imhost /usr/local/bin/imhost
COPY --from=build --chown=imhost /out/plugins /plugins
# What the shipped plugins may do (the operator's file, outside /plugins).
COPY --from=build /src/plugins/grants.toml /etc/imhost/plugin-grants.toml
USER imhost
# The compiled-plugin cache lives in the user's home (a volume keeps it
# across restarts, so plugins do not recompile).
VOLUME ["/plugins", "/var/lib/imhost"]
ENV IMHOST_LISTEN=0.0.0.0:6001 \
    IMHOST_PLUGINS=/plugins \
    IMHOST_PLUGIN_GRANTS=/etc/imhost/plugin-grants.toml \
    IMHOST_PLUGIN_CACHE=/var/lib/imhost/plugin-cache
EXPOSE 6001
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/imhost"]
