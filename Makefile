# Shortcuts for the scripts under config/dev (the README uses the scripts directly).
.PHONY: setup serve demo test lint cluster-start cluster-stop
setup:
	bash config/dev/setup.sh
serve:
	bash config/dev/serve.sh
demo:
	bash config/dev/serve.sh --demo
test:
	bash config/dev/test.sh
lint:
	.venv/bin/ruff check . && .venv/bin/mypy
cluster-start:
	bash config/redis-cluster/cluster.sh start
cluster-stop:
	bash config/redis-cluster/cluster.sh stop
