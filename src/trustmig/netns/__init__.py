"""Network namespaces as separate hosts on one machine: the lab's management, migration and guest
networks (:mod:`trustmig.netns.topology`) and sockets opened inside a namespace
(:mod:`trustmig.netns.enter`). Imports no other trustmig package."""
