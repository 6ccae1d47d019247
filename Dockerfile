# Portunus in a container.
#   docker build -t portunus .
#   docker run -d --name portunus -p 80:80 -p 443:443 \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro -v portunus-data:/data \
#     -v $PWD/portunus.toml:/etc/portunus/portunus.toml:ro portunus
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portunus

FROM debian:bookworm-slim
# ca-certificates: the ACME client checks Let's Encrypt's (or ZeroSSL's) HTTPS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/portunus /usr/local/bin/portunus
ENV PORTUNUS_CONFIG=/etc/portunus/portunus.toml
VOLUME ["/data"]
EXPOSE 80 443
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/portunus"]
CMD ["run"]
