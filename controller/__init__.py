"""The hafs node controller: one process per node that runs the modules of a two-node
cluster (heartbeats, mirror states, virtual IP, scripts, checkers) in SafeKit's vocabulary.
`controller.config` reads and validates cluster.xml and the modules' userconfig.xml."""
