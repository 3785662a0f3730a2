"""The paper's analyses (§4.3, Appendix A.2): module selection by token sparsity (Table 4), cumulative
selection (Figure 2) and threshold dynamics (Figure 3)."""
