# The two commands: `make demo` (the main job on embedded data) and `make test`.
# Both create .venv on their own (tools/setup_env.sh); the mmcv build is cached in ~/.cache/mmsn.
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env test demo clean

env:
	@bash tools/setup_env.sh

# pytest exits 5 when it collects nothing (e.g. a -k filter that matches no test): report it
# loudly but do not count it as a failure.
test: env
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; rc=0; fi; exit $$rc

demo: env
	@$(PYTHON) tools/demo.py --work-dir work_dirs/demo

clean:
	rm -rf work_dirs .pytest_cache
