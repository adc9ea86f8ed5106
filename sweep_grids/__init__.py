"""Shipped sweep grids (`sidetune sweep --grid NAME`), as YAML files beside this one."""
