"""MPI helpers, the lowest layer: bounded waits and communicator checks (:mod:`.comm`), the
launcher's world (:mod:`.world`), ULFM's steps (:mod:`.elastic`), node discovery (:mod:`.nodes`),
communicators of mpisign's own (:mod:`.isolation`) and the small exchanges beside a vote
(:mod:`.exchanges`). Nothing here knows of signs, topologies or optimizers."""
