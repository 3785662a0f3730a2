# Paper tables: run a grid (resumable) and aggregate it into results/tables/. Included by the Makefile.
#
#   make table3 PRESET=cpu JOBS=2   GLUE, 4 tasks x 6 methods x 3 seeds, MiniLM-L6 on 2 CPU cores (~4.4 h of runs at their measured 400-500 s), then aggregate
#   make table3                     the paper's Table 3 grid (DeBERTaV3-base, Table 6, 3 seeds): needs a GPU
#   make table2 [PRESET=cpu]        Table 2: LLaVA-1.5-7B (GPU); PRESET=cpu: the tiny LLaVA on 707 captioned images
#   make table1 [PRESET=cpu]        the CSR grid of Table 1 (LLaMA-3.1-8B; PRESET=cpu: the CSR helper's small model)
#   make aggregate-table3 [PRESET=cpu]   only rebuild results/tables/table3[_cpu].{md,tex} from the runs so far
#   make table3-calibrate PRESET=cpu JOBS=2   seed-1 sweep of the TS methods over the gate scale s (CALIBRATE_S)
#                                   at the paper's λ, 4 tasks x 3 methods x 2 s = 24 runs; the aggregator names
#                                   each point, and the setting then run at seeds 2,3 becomes the calibrated row
#   make aggregate-table1 / aggregate-table5 [PRESET=cpu]
#
# Re-running a grid skips every run whose result.json exists (++skip_existing=true, see
# tsft/report/grid.py), so an interrupted grid continues where it stopped. SEEDS=1,2,3 overrides
# the seeds (default 1,2,3 for both presets: the tables give TS − dense paired over seeds with a 95 % interval).

PRESET ?= paper
# Processes side by side, each with cores/JOBS threads (scripts/run_grid.py); JOBS=2 on 2 cores gives
# 1.3x the throughput of one process for the small CPU-preset models.
JOBS ?= 1
PYTHON ?= .venv/bin/python
RUNS_DIR ?= results/runs
TABLES_DIR ?= results/tables

# Keep CPU_GLUE_TASKS equal to GLUE_TASKS["cpu"] in tsft/report/tables.py (checked by tests/test_tables_grid.py).
# RTE is not in the CPU preset (configs/experiment/table3_cpu_common.yaml says why).
CPU_GLUE_TASKS := cola mrpc sst2 stsb
PAPER_GLUE_TASKS := mnli cola qnli rte mrpc qqp sst2 stsb
TABLE3_METHODS := lora ts_lora adalora ts_adalora adapter ts_adapter
TABLE1_METHODS := lora ts_lora dora ts_dora adalora ts_adalora
TABLE2_METHODS := lora ts_lora dora ts_dora adalora ts_adalora

tables_comma := ,
tables_empty :=
tables_space := $(tables_empty) $(tables_empty)
tables_csv = $(subst $(tables_space),$(tables_comma),$(strip $(1)))

# Experiment configs: configs/experiment/table3_<method>.yaml, or table3_cpu_<method>.yaml for the CPU preset.
tables_exp_prefix = $(if $(filter cpu,$(PRESET)),cpu_,)
tables_seeds = $(or $(SEEDS),1$(tables_comma)2$(tables_comma)3)
tables_glue_tasks = $(if $(filter cpu,$(PRESET)),$(CPU_GLUE_TASKS),$(PAPER_GLUE_TASKS))

# Refuses before anything is trained: an unknown PRESET, or the paper preset without a CUDA GPU
# (no nvidia-smi answers at once; otherwise torch decides).
define tables_check_preset
	@case "$(PRESET)" in cpu|paper) ;; *) echo "error: PRESET must be cpu or paper (got '$(PRESET)')" >&2; exit 2;; esac
	@if [ "$(PRESET)" != cpu ] && ! { command -v nvidia-smi >/dev/null 2>&1 && \
		$(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }; then \
		echo "error: 'make $@' runs the paper-scale grid, which needs a CUDA GPU, and none is visible." >&2; \
		echo "       On CPU run the small-scale reproduction instead: make $@ PRESET=cpu" >&2; \
		exit 2; \
	fi
endef

# $(call tables_run_grid,<table>,<methods>,<task override>,<extra tables>): runs the grid, then
# aggregates whatever finished (a failed run shows as missing), then exits with the grid's status
# so a failure is not hidden behind a table.
define tables_run_grid
	status=0; \
	$(PYTHON) scripts/run_grid.py --jobs $(JOBS) --log-dir multirun/grid-logs/$@-$(PRESET) \
		--deal 'experiment=$(call tables_csv,$(addprefix $(1)_$(tables_exp_prefix),$(2)))' -- \
		$(3) 'seed=$(tables_seeds)' ++skip_existing=true || status=$$?; \
	for table in $(1) $(4); do $(MAKE) --no-print-directory aggregate-$$table PRESET=$(PRESET) || status=$$?; done; \
	exit $$status
endef

.PHONY: table1 table2 table3 table3-calibrate aggregate-table1 aggregate-table2 aggregate-table3 aggregate-table5

table3:
	$(tables_check_preset)
	$(call tables_run_grid,table3,$(TABLE3_METHODS),'task=$(call tables_csv,$(addprefix glue/,$(tables_glue_tasks)))')

# At a few hundred steps s, which bounds tau's step, sets the sparsity more than λ does (docs/small-scale.md).
CALIBRATE_S ?= 3e-4,1e-3
TABLE3_TS_METHODS := $(filter ts_%,$(TABLE3_METHODS))

table3-calibrate: SEEDS = 1
table3-calibrate:
	$(tables_check_preset)
	$(call tables_run_grid,table3,$(TABLE3_TS_METHODS),'task=$(call tables_csv,$(addprefix glue/,$(tables_glue_tasks)))' 'sparsity.s=$(CALIBRATE_S)')

table1:
	$(tables_check_preset)
	$(call tables_run_grid,table1,$(TABLE1_METHODS),task=csr,table5)

# Table 2 at the CPU scale first trains the stage-1 projector that every method starts from (model.init_from)
table2:
	$(tables_check_preset)
	$(if $(filter cpu,$(PRESET)),$(PYTHON) train.py experiment=table2_cpu_stage1 ++skip_existing=true)
	$(call tables_run_grid,table2,$(TABLE2_METHODS),,)

aggregate-table1 aggregate-table2 aggregate-table3 aggregate-table5: aggregate-%:
	$(PYTHON) scripts/make_table.py $* --preset $(PRESET) --runs $(RUNS_DIR) --out $(TABLES_DIR)
