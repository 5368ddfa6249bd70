# The image of the Helm chart: starlight-registry, starlight-worker and
# ctr-starlight on Debian 12 (glibc: the SQLite index is cgo).
#   docker build --build-arg VERSION=$(git describe --always --dirty) -t starlight .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN make build VERSION=$VERSION COMMIT=$COMMIT

FROM debian:bookworm-slim
# ca-certificates for HTTPS registries; fuse3 for /dev/fuse tooling (the
# worker mounts directly as root and needs no fusermount).
RUN apt-get update \
	&& apt-get install -y --no-install-recommends ca-certificates fuse3 \
	&& rm -rf /var/lib/apt/lists/*
COPY --from=build /src/bin/ /usr/local/bin/
ENV OTEL_TRACES_EXPORTER=none
ENTRYPOINT []
CMD ["starlight-worker", "--help"]
