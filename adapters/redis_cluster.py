"""Redis Cluster: its nodes, and which one serves each hash slot.

The stores route every call themselves, to the node serving its key's slot, so that
the batching front (:mod:`asyncapy.adapters.redis_batching`) still sends one batch per
node per round trip; redis-py's ``RedisCluster`` is used only for what it knows well:
discovering the nodes and the slot map, and one connection pool per node. The
routing and the following of ``MOVED``, ``ASK`` and ``TRYAGAIN`` live in the front's
dispatch; what the cluster itself knows (the slot of a key, the pool of its master or
of any node, a slot moved, whether a node still serves a slot) lives here.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import redis

__all__ = ["ClusterClient"]


class ClusterClient:
    """The nodes of a Redis Cluster, and which one serves each hash slot.

    A thin layer over redis-py's ``RedisCluster``, used only for what it knows well
    (discovering the nodes and the slot map, one connection pool per node): the stores
    send their calls themselves, each to the pool of the node serving its slot, so the
    batching of :class:`~asyncapy.adapters.redis_batching._RedisAdapter` works per
    node. Created without connecting (the slot map is fetched on first use, and again
    after a ``MOVED`` reply or a lost node), so a server can start while the cluster
    is down, as with one node.

    :param hosts: ``[(host, port), ...]``, any nodes of the cluster (more than one,
        so that one down node does not stop the discovery).
    :param tls: redis-py's TLS arguments (``ssl=True``, ``ssl_ca_certs``...) for a
        cluster whose nodes speak TLS (``rediss+cluster://``), else ``None``.
    """

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        *,
        username: Optional[str] = None,
        password: Optional[str] = None,
        max_connections: int = 16,
        timeout: float = 2.0,
        location: str = "redis+cluster://?",
        tls: Optional[dict] = None,
    ) -> None:
        self.hosts: list[tuple[str, int]] = list(hosts)
        self.location = location
        """The cluster's URL without credentials, for logs."""
        self.max_connections = max_connections
        self._kwargs = dict(
            username=username, password=password, socket_timeout=timeout,
            socket_connect_timeout=timeout, health_check_interval=15, retry_on_timeout=False,
            **(tls or {}),
        )
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._stale = False

    def _client(self) -> Any:
        with self._lock:
            cluster = self._cluster
            if cluster is None:
                from redis.cluster import ClusterNode, RedisCluster

                cluster = self._cluster = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self.hosts],
                    max_connections=self.max_connections,
                    **self._kwargs,
                )
                self._stale = False
            elif self._stale:
                self._stale = False
                cluster.nodes_manager.initialize()
            return cluster

    def stale(self) -> None:
        """The slot map may be wrong (a ``MOVED`` reply, a node lost): fetch it again
        before the next routing."""
        self._stale = True

    @staticmethod
    def slot(key: Optional[str]) -> int:
        """The hash slot of ``key`` (its ``{tag}`` if it has one); a call without a key
        goes to the node of slot 0's... any master would do."""
        from redis.crc import key_slot

        return key_slot((key or "").encode())

    def node_client(self, key: str) -> redis.Redis:
        """The redis-py client of the master serving ``key``'s slot now."""
        cluster = self._client()
        node = cluster.nodes_manager.get_node_from_slot(self.slot(key))
        return cluster.get_redis_connection(node)

    def pool(self, key: str) -> Any:
        """The connection pool of the master serving ``key``'s slot now."""
        return self.node_client(key).connection_pool

    def node_pool(self, host: str, port: int) -> Any:
        """The connection pool of the node at ``host:port`` (where an ``ASK`` reply
        sends a call: the target of a slot being migrated)."""
        cluster = self._client()
        node = cluster.nodes_manager.get_node(host=host, port=port)
        if node is None:
            from redis.cluster import ClusterNode

            node = ClusterNode(host, port)
            with self._lock:
                node = cluster.nodes_manager.nodes_cache.setdefault(node.name, node)
        return cluster.get_redis_connection(node).connection_pool

    def moved(self, error: Any) -> None:
        """A ``MOVED`` reply: its slot is served by the node it names, from now on (the
        slot map is updated at once; the rest of it is fetched again only if a node
        is lost)."""
        self._client().nodes_manager.move_slot(error)

    def disconnect(self) -> None:
        """Close every node's connections."""
        with self._lock:
            cluster = self._cluster
        if cluster is not None:
            for node in list(cluster.nodes_manager.nodes_cache.values()):
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()

    def __repr__(self) -> str:
        return f"ClusterClient({self.location})"


def _still_serving(slot: int) -> Any:
    """A check for a Cluster key tracker: does the node its link is on still serve the
    keys' slot? ``CLUSTER SLOTS`` asked of that node, on one of its pooled connections
    (the link itself is subscribed and can ask nothing)."""

    def verify(client: redis.Redis, link: Any) -> bool:
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("CLUSTER", "SLOTS")
            ranges = conn.read_response()
        finally:
            pool.release(conn)
        for row in ranges:
            if int(row[0]) <= slot <= int(row[1]):
                host, port = row[2][0], int(row[2][1])
                host = host.decode() if isinstance(host, bytes) else host
                return (host, port) == (link.host, link.port)
        return False

    return verify
