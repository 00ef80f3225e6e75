# The two commands: `make demo` (the main job on embedded data) and `make test`.
# Both create .venv on their own (tools/setup_env.sh); the mmcv build is cached in ~/.cache/mmsn.
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env test quick demo study clean

env:
	@bash tools/setup_env.sh

# The suite runs on every core, up to 4 (pytest-xdist; 2 workers on CI's 2 cores): most tests
# keep one core busy, and the multi-process ones wait on each other's processes. PYTEST_ARGS
# adds options, e.g. PYTEST_ARGS="-n 0" for one process.
# pytest exits 5 when it collects nothing (e.g. a -k filter that matches no test): report it
# loudly but do not count it as a failure.
PYTEST = $(PYTHON) -m pytest -n auto --maxprocesses 4 --dist worksteal $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; rc=0; fi; exit $$rc

# The whole suite (what CI runs).
test: env
	@$(call PYTEST,)

# The quick tier for development (under 3 minutes on 2 cores): every module's core
# behaviour, without the tests marked slow.
quick: env
	@$(call PYTEST,-m "not slow")

demo: env
	@$(PYTHON) tools/demo.py --work-dir work_dirs/demo

# The norm study on the demo data (docs/norm_switch.md): not part of `make test`.
study: env
	@$(PYTHON) -c "from mmsn.demo.shapes import make_shapes_dataset as m; m('data/shapes')"
	@$(PYTHON) tools/analysis_tools/norm_study.py configs/demo/fcn_r18_shapes.py \
		--norms BN GN SN SyncSN --batch-sizes 4 2 1 --nproc 2 --images 3000 \
		--work-dir work_dirs/norm_study/demo

clean:
	rm -rf work_dirs .pytest_cache
