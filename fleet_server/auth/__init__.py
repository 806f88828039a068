"""Authentication and authorization: users, roles, API tokens, console sessions, the route policy."""
