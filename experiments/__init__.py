"""The experiments shipped with iclsim (installed as ``iclsim.experiments``): one module per figure or
study, each defining ``EXPERIMENT``; ``iclsim list`` shows them."""
