# The paper's analyses (§4.3, Appendix A.2), each by one command; included by the Makefile.
#
#   make table4  [PRESET=cpu] [JOBS=2] [SEEDS=1,2,3]   module selection by TS-DoRA's sparsity (Table 4)
#   make figure2 [PRESET=cpu] [JOBS=2] [SEEDS=1]       cumulative selection, LoRA / DoRA / AdaLoRA (Figure 2)
#   make figure3 [PRESET=cpu]                          loss and tau per step, with and without Adam (Figure 3)
#   make aggregate-table4 / aggregate-figure2 / aggregate-figure3   only rebuild the outputs from the runs
#
# Paper scale: LLaMA-3.1-8B on commonsense reasoning (configs/experiment/analysis_*.yaml; a GPU job).
# PRESET=cpu: MiniLM-L6 on GLUE at the CPU preset of Table 3 (configs/experiment/analysis_cpu_*.yaml).
# Each first trains the TS source runs (skipped once finished), then the dense runs on the selected modules.

analysis_exp = analysis$(if $(filter cpu,$(PRESET)),_cpu,)
# tasks: GLUE SST-2 and MRPC at the CPU preset (Figure 2: SST-2 only, 30 runs); CSR at paper scale
analysis_tasks = $(if $(filter cpu,$(PRESET)),task=glue/sst2$(tables_comma)glue/mrpc,)
figure2_tasks = $(if $(filter cpu,$(PRESET)),task=glue/sst2,)
FIGURE2_SEEDS ?= $(or $(SEEDS),1)
TABLE4_RULES := all,s_low,s_high,norm_relative,norm_abs,half_rank
FIGURE2_P := 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9
# Figure 3's module: the paper's layer 20 of 32 of LLaMA-3.1-8B; at the CPU preset layer 4 of MiniLM's 6
FIGURE3_MODULE ?= $(if $(filter cpu,$(PRESET)),encoder.layer.4.attention.self.value,layers.20.self_attn.v_proj)
analysis_grid = $(PYTHON) scripts/run_grid.py --jobs $(JOBS) --log-dir multirun/grid-logs/$@-$(PRESET)

.PHONY: table4 figure2 figure3 aggregate-table4 aggregate-figure2 aggregate-figure3

table4:
	$(tables_check_preset)
	status=0; \
	$(analysis_grid) --deal peft=dora -- experiment=$(analysis_exp)_source $(analysis_tasks) ++skip_existing=true \
	&& $(analysis_grid) --deal selection=$(TABLE4_RULES) -- experiment=$(analysis_exp)_select peft=dora \
		$(analysis_tasks) 'seed=$(tables_seeds)' ++skip_existing=true \
	&& $(analysis_grid) --deal selection.draw=0,1,2 -- experiment=$(analysis_exp)_select peft=dora selection=random \
		$(analysis_tasks) 'seed=$(tables_seeds)' ++skip_existing=true || status=$$?; \
	$(MAKE) --no-print-directory aggregate-table4 PRESET=$(PRESET) || status=$$?; exit $$status

figure2:
	$(tables_check_preset)
	status=0; \
	$(analysis_grid) --deal peft=lora,dora,adalora -- experiment=$(analysis_exp)_source $(figure2_tasks) \
		++skip_existing=true \
	&& $(analysis_grid) --deal selection.p=$(FIGURE2_P) -- experiment=$(analysis_exp)_select peft=lora,dora,adalora \
		selection=s_low $(figure2_tasks) 'seed=$(FIGURE2_SEEDS)' ++skip_existing=true \
	&& $(analysis_grid) --deal peft=lora,dora,adalora -- experiment=$(analysis_exp)_select selection=all \
		$(figure2_tasks) 'seed=$(FIGURE2_SEEDS)' ++skip_existing=true || status=$$?; \
	$(MAKE) --no-print-directory aggregate-figure2 PRESET=$(PRESET) || status=$$?; exit $$status

figure3:
	$(tables_check_preset)
	status=0; \
	$(analysis_grid) --deal sparsity.adam=true,false -- experiment=$(analysis_exp)_trace $(figure2_tasks) \
		++skip_existing=true || status=$$?; \
	$(MAKE) --no-print-directory aggregate-figure3 PRESET=$(PRESET) || status=$$?; exit $$status

aggregate-table4 aggregate-figure2: aggregate-%:
	$(PYTHON) scripts/make_analysis.py $* --preset $(PRESET) --runs $(RUNS_DIR)

aggregate-figure3:
	$(PYTHON) scripts/make_analysis.py figure3 --preset $(PRESET) --runs $(RUNS_DIR) --module $(FIGURE3_MODULE)
