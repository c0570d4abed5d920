"""A function whose invokes the invoke-summary extension sums up: it counts the primes below a number."""


def handler(event, context):
    limit = int(event.get("below", 10000))
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\0\0"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytearray(len(range(n * n, limit, n)))
    return {"below": limit, "primes": sum(sieve)}
