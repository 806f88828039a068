"""A throwaway PostgreSQL cluster fixture. Filled in by the fleet-server work."""
