"""Thin Starlette endpoints: validate, call the domain modules, respond."""
