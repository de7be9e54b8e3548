"""Flower apps: one ClientApp for every federation mode, a ServerApp driving a strategy."""
