"""A SPIFFE workload in Python with py-spiffe, run by tests/clients_e2e.rs against a real sigil-agent.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock python spiffe_client.py [--rotation SECS]

Opens an X.509 watch (WorkloadApiClient.stream_x509_contexts) and prints its first SVID, then
fetches the X.509 and JWT bundles and a JWT-SVID, which it validates through the agent and
locally against the JWT bundle. With --rotation it then keeps the watch open until a new
X509-SVID (another serial) arrives, or fails after SECS.

Prints one line per result (`<what> <values...>`) for the test to check; exits non-zero with the
reason on stderr on any failure.
"""

import argparse
import queue
import sys

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from spiffe import JwtSvid, WorkloadApiClient

# Generous: CI machines are small and loaded.
TIMEOUT = 90.0


def serial(svid):
    return format(svid.leaf.serial_number, "x")


def verify_issued_by(cert, issuer):
    """Whether `issuer`'s key signed `cert` (EC or RSA PKCS#1 v1.5 CAs)."""
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        else:
            return False
    except Exception:
        return False
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--audience", default="sigil-e2e")
    parser.add_argument("--rotation", type=float, metavar="SECS", help="wait this long for a rotation on the watch")
    args = parser.parse_args()

    # No socket_path: py-spiffe reads SPIFFE_ENDPOINT_SOCKET, as a deployed workload would.
    client = WorkloadApiClient(default_timeout=TIMEOUT)
    updates = queue.Queue()
    watch = client.stream_x509_contexts(
        on_success=lambda ctx: updates.put(ctx),
        on_error=lambda err: updates.put(err),
        retry_connect=False,
    )
    try:
        run(client, updates, args)
    finally:
        watch.cancel()
        client.close()


def next_context(updates, timeout):
    item = updates.get(timeout=timeout)
    if isinstance(item, Exception):
        raise RuntimeError(f"X.509 watch failed: {item!r}")
    return item


def run(client, updates, args):
    first = next_context(updates, TIMEOUT).default_svid
    td = first.spiffe_id.trust_domain
    print(f"x509_svid {first.spiffe_id} {serial(first)}", flush=True)

    x509_bundles = client.fetch_x509_bundles()
    for bundle in x509_bundles.bundles:
        print(f"x509_bundle {bundle.trust_domain} {len(bundle.x509_authorities)}", flush=True)
    roots = x509_bundles.get_bundle_for_trust_domain(td).x509_authorities
    if not any(verify_issued_by(first.cert_chain[-1], root) for root in roots):
        raise RuntimeError("the X509-SVID does not chain to its trust domain's bundle")
    print(f"x509_verified {first.spiffe_id}", flush=True)

    jwt_bundles = client.fetch_jwt_bundles()
    for bundle in jwt_bundles.bundles:
        print(f"jwt_bundle {bundle.trust_domain} {len(bundle.jwt_authorities)}", flush=True)

    svid = client.fetch_jwt_svid(audience={args.audience})
    print(f"jwt_svid {svid.spiffe_id}", flush=True)
    by_agent = client.validate_jwt_svid(svid.token, args.audience)
    print(f"jwt_validated {by_agent.spiffe_id} agent", flush=True)
    jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    local = JwtSvid.parse_and_validate(svid.token, jwt_bundle, {args.audience})
    print(f"jwt_validated {local.spiffe_id} local", flush=True)
    try:
        client.validate_jwt_svid(svid.token, "another-audience")
    except Exception:
        print("jwt_refused another-audience", flush=True)
    else:
        raise RuntimeError("the agent validated the JWT-SVID for another audience")

    if args.rotation:
        # The same open watch delivers the rotated SVID (the agent rotates at about half the TTL).
        while True:
            try:
                ctx = next_context(updates, args.rotation)
            except queue.Empty:
                raise RuntimeError(f"no rotated X509-SVID on the watch within {args.rotation} s")
            svid = ctx.default_svid
            if serial(svid) != serial(first):
                print(f"x509_rotated {svid.spiffe_id} {serial(svid)}", flush=True)
                break


if __name__ == "__main__":
    try:
        main()
    except Exception as err:
        print(f"python client: {err!r}", file=sys.stderr)
        sys.exit(1)
