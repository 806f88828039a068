"""The rollout machinery's I/O: the command bridge (sign, publish, resend, acknowledge) and the rollout loop
that applies the pure policy of :mod:`fleet_server.rollouts` to the database."""
