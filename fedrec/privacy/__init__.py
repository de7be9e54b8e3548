"""Privacy mechanisms: local DP-SGD (Opacus), later user-level DP, synthetic release and audits."""
