"""``certmq simulate``: renewal load per day for a fleet, with and without hash staggering.

Pure arithmetic on :mod:`protocol.renewal` -- no broker, no CA. Every device is
issued a certificate on day 0 (the article's worst case: a fleet installed in one
go); each renews at its own moment and the new certificate starts then, for
``--days`` days. Without staggering every device renews at the same fraction of
its lifetime (the classic "renew 90 days before expiry" cron), so the whole fleet
hits the CA on the same day. The command prints the busiest day against the mean
over the renewal window and writes a PNG of both curves.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import Counter
from pathlib import Path

from protocol import renewal

__all__ = ["configure", "run", "simulate"]

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the simulation's options."""
    parser.add_argument("--devices", type=_bounded(1, 10_000_000), default=50_000, help="fleet size (default 50,000)")
    parser.add_argument("--days", type=_bounded(1, 36_500), default=730, help="days to simulate (default 730)")
    parser.add_argument("--lifetime", type=_bounded(2, 3650), default=730,
                        help="certificate lifetime in days (default 730, the article's two years)")
    parser.add_argument("--window", type=_window, default=(0.75, 0.90), metavar="START,END",
                        help="renewal window as fractions of the lifetime (default 0.75,0.90)")
    parser.add_argument("--out", type=Path, default=Path("renewal-load.png"), help="PNG to write")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _bounded(low: int, high: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            value = int(text.replace(",", "").replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:,} and {high:,}")
        return value

    return parse


def _window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(","))
        policy = renewal.RenewalPolicy(start=start, end=end)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"expected START,END with 0 <= START < END <= 1 ({exc})") from None
    return policy.start, policy.end


def simulate(*, devices: int, days: int, lifetime: int, window: tuple[float, float]) -> dict[str, object]:
    """Renewals per day, staggered and not; and the busiest-day / mean ratio over the first window."""
    policy = renewal.RenewalPolicy(start=window[0], end=window[1])
    life = dt.timedelta(days=lifetime)
    horizon = EPOCH + dt.timedelta(days=days)
    staggered: Counter[int] = Counter()
    fixed: Counter[int] = Counter()
    for n in range(devices):
        device_id = f"device-{n:08d}"
        nb = EPOCH
        while True:
            when = renewal.renewal_time(device_id, not_before=nb, not_after=nb + life, policy=policy)
            if when >= horizon:
                break
            staggered[(when - EPOCH).days] += 1
            nb = when
    # Unstaggered: everyone renews at the end of the window, the same day, every generation.
    day = EPOCH + life * window[1]
    while day < horizon:
        fixed[(day - EPOCH).days] += devices
        day += life * window[1]
    first = renewal.renewal_window(not_before=EPOCH, not_after=EPOCH + life, policy=policy)
    first_days = range((first.start - EPOCH).days, min(days, (first.end - EPOCH).days + 1))
    in_window = [staggered[d] for d in first_days]
    mean = sum(in_window) / len(in_window) if in_window else 0.0
    return {
        "devices": devices,
        "days": days,
        "lifetime_days": lifetime,
        "window": list(window),
        "renewals": sum(staggered.values()),
        # The article's arithmetic: a fleet spread over the whole lifetime renews devices/lifetime a day.
        "steady_state_per_day": round(devices / lifetime, 1),
        "first_window_days": [first_days.start, first_days.stop - 1] if in_window else [],
        "staggered_mean_per_day": round(mean, 2),
        "staggered_max_per_day": max(in_window, default=0),
        "staggered_max_over_mean": round(max(in_window, default=0) / mean, 3) if mean else None,
        "unstaggered_max_per_day": max(fixed.values(), default=0),
        "per_day": [staggered[d] for d in range(days)],
        "per_day_unstaggered": [fixed[d] for d in range(days)],
    }


def _plot(result: dict[str, object], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_day = result["per_day"]
    fixed = result["per_day_unstaggered"]
    assert isinstance(per_day, list) and isinstance(fixed, list)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    bottom.bar(range(len(per_day)), per_day, width=1.0, color="#2a7ab0")
    bottom.set_title(f"hash-staggered: busiest day / mean = {result['staggered_max_over_mean']}")
    top.bar(range(len(fixed)), fixed, width=3.0, color="#c0392b")
    top.set_title(f"fixed schedule: {result['unstaggered_max_per_day']:,} renewals on one day")
    for ax in (top, bottom):
        ax.set_ylabel("renewals / day")
    bottom.set_xlabel("day")
    fig.suptitle(f"{result['devices']:,} devices, {result['lifetime_days']}-day certificates, all issued on day 0")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Simulate, print the ratio, write the PNG."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("certmq simulate needs matplotlib: pip install 'certmq[plot]'", file=sys.stderr)
        return 2
    result = simulate(devices=args.devices, days=args.days, lifetime=args.lifetime, window=args.window)
    _plot(result, args.out)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("per_day")} | {"png": str(args.out)}))
        return 0
    print(f"{result['devices']:,} devices, {result['lifetime_days']}-day certificates issued on day 0, "
          f"{result['days']} days simulated: {result['renewals']:,} renewals")
    print(f"  staggered:   mean {result['staggered_mean_per_day']:,} / day over the first window, "
          f"busiest day {result['staggered_max_per_day']:,} -> max/mean {result['staggered_max_over_mean']}")
    print(f"  unstaggered: {result['unstaggered_max_per_day']:,} renewals on a single day")
    print(f"  once renewals have spread over whole lifetimes: {result['steady_state_per_day']:,} / day "
          f"({result['devices']:,} / {result['lifetime_days']} days)")
    print(f"  plot: {args.out}")
    return 0
