# Operator shortcuts for Docker Compose, as the original's `pnpm docker:*` scripts.
# Another Compose: `make docker-up COMPOSE=docker-compose` (or podman-compose).
COMPOSE ?= docker compose
# Podman (podman-compose) builds OCI images unless told, and those drop HEALTHCHECK and STOPSIGNAL.
export BUILDAH_FORMAT := docker
PROD := -f compose.yaml -f compose.prod.yaml

.PHONY: demo docker-up docker-down docker-logs docker-prod container-check

demo:  ## see it answer without a Claude account (a local model stand-in; Ctrl-C stops it)
	scripts/demo

docker-up: .env  ## build and start the service (compose.yaml)
	$(COMPOSE) up -d --build

docker-down:  ## stop and remove the container (volumes stay)
	$(COMPOSE) $(PROD) down

docker-logs:  ## follow the service's log
	$(COMPOSE) logs -f

docker-prod: .env  ## build and start with the production settings (compose.prod.yaml)
	$(COMPOSE) $(PROD) up -d --build

container-check:  ## what CI checks: lint, build with podman, smoke test
	scripts/container-check

.env:
	@echo "no .env: cp .env.example .env, then set API_KEYS (README: Docker and compose)" >&2
	@exit 1
