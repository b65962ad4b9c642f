# Operator shortcuts for Docker Compose, as the original's `pnpm docker:*` scripts.
# Compose: the first of `docker compose`, `docker-compose` and `podman-compose` found, or the one
# named: `make docker-up COMPOSE=podman-compose`.
# The build (README: "Docker and compose"): another base image, `make docker-up BASE=<image>`; a
# package index behind a proxy or with its own CA, `PIPCONF=/etc/pip.conf CACERT=<CA bundle>`
# (the build secrets pipconf and cacert).
ifeq ($(origin COMPOSE),undefined)
COMPOSE := $(shell \
  if docker compose version >/dev/null 2>&1; then echo docker compose; \
  elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; \
  elif command -v podman-compose >/dev/null 2>&1; then echo podman-compose; fi)
endif
# compose.yaml reads them from the environment; exported only when given (an empty BASE would
# replace the Dockerfile's default with nothing).
$(foreach name,BASE PIPCONF CACERT,$(if $($(name)),$(eval export $(name))))
# Podman (podman-compose) builds OCI images unless told, and those drop HEALTHCHECK and STOPSIGNAL.
export BUILDAH_FORMAT := docker
PROD := -f compose.yaml -f compose.prod.yaml
REPLICAS := -f compose.replicas.yaml

.PHONY: demo docker-up docker-down docker-logs docker-prod docker-replicas docker-replicas-down \
	container-check compose

demo:  ## see it answer without a Claude account (a local model stand-in; Ctrl-C stops it)
	scripts/demo

docker-up: .env compose  ## build and start the service (compose.yaml)
	$(COMPOSE) up -d --build

docker-down: compose  ## stop and remove the container (volumes stay)
	$(COMPOSE) $(PROD) down

docker-logs: compose  ## follow the service's log
	$(COMPOSE) logs -f

docker-prod: .env compose  ## build and start with the production settings (compose.prod.yaml)
	$(COMPOSE) $(PROD) up -d --build

docker-replicas: .env compose  ## three replicas behind a balancer on PostgreSQL (compose.replicas.yaml)
	$(COMPOSE) $(REPLICAS) up -d --build

docker-replicas-down: compose  ## stop and remove the replicas (volumes stay)
	$(COMPOSE) $(REPLICAS) down

container-check:  ## what CI checks: lint, build with podman, smoke test
	scripts/container-check

compose:
ifeq ($(strip $(COMPOSE)),)
	@echo "no Compose found: install one of the Docker Compose plugin (docker compose; Debian/Ubuntu:" >&2
	@echo "docker-compose-plugin from Docker's apt repository), docker-compose, or podman-compose" >&2
	@echo "(apt-get install podman-compose); or name yours: make $(or $(MAKECMDGOALS),docker-up) COMPOSE=..." >&2
	@exit 1
endif

.env:
	@echo "no .env: cp .env.example .env, then set API_KEYS (README: Docker and compose)" >&2
	@exit 1
