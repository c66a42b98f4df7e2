"""What netra processes share through Redis when they run as a cluster.

Nothing in netra uses it yet: this is the first building block of cluster
mode (NETRA_REDIS_URL), the limits that must hold across every worker and
machine, as leases that expire by themselves when their process dies.
"""

from ._redis import redis_client as redis_client
from .leases import Lease as Lease
from .leases import LeaseKeeper as LeaseKeeper
from .leases import LimiterStatistics as LimiterStatistics
from .leases import SharedCapacityLimiter as SharedCapacityLimiter

__all__ = ["Lease", "LeaseKeeper", "LimiterStatistics", "SharedCapacityLimiter", "redis_client"]
