// A SPIFFE workload in Java, run by tests/clients_e2e.rs against a real sigil-agent: plain
// grpc-java over Netty's epoll Unix domain socket, stubs generated from
// proto/spiffe/workload.proto at build time. No SPIFFE library: this is what any gRPC client
// does (the `workload.spiffe.io: true` metadata on every call, nothing set for :authority).
//
//   SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock java -jar target/sigil-java-client.jar [audience]
//
// Prints one line per result (`<what> <values...>`) for the test to check; exits non-zero with
// the reason on stderr on any failure.
//
// In the unnamed package because the generated classes are: the standard workload.proto has no
// package and no java_package option.

import com.google.protobuf.ByteString;
import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.protobuf.util.JsonFormat;
import io.grpc.Context;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.stub.MetadataUtils;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.MultiThreadIoEventLoopGroup;
import io.netty.channel.epoll.EpollDomainSocketChannel;
import io.netty.channel.epoll.EpollIoHandler;
import io.netty.channel.unix.DomainSocketAddress;
import java.io.ByteArrayInputStream;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.AlgorithmParameters;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.Signature;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.spec.ECGenParameterSpec;
import java.security.spec.ECParameterSpec;
import java.security.spec.ECPoint;
import java.security.spec.ECPublicKeySpec;
import java.security.spec.PKCS8EncodedKeySpec;
import java.security.spec.RSAPublicKeySpec;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

public final class Main {
  /** Generous: CI machines are small and loaded. */
  private static final long TIMEOUT_SECONDS = 90;

  private Main() {}

  public static void main(String[] args) {
    try {
      run(args.length > 0 ? args[0] : "sigil-e2e");
    } catch (Exception e) {
      System.err.println("java client: " + e);
      e.printStackTrace();
      System.exit(1);
    }
    System.exit(0);
  }

  private static void run(String audience) throws Exception {
    String endpoint = System.getenv("SPIFFE_ENDPOINT_SOCKET");
    if (endpoint == null || !endpoint.startsWith("unix:")) {
      throw new IllegalArgumentException("SPIFFE_ENDPOINT_SOCKET must be unix:///path, got " + endpoint);
    }
    String path = endpoint.replaceFirst("^unix:(//)?", "");

    EventLoopGroup group = new MultiThreadIoEventLoopGroup(1, EpollIoHandler.newFactory());
    ManagedChannel channel = NettyChannelBuilder.forAddress(new DomainSocketAddress(path))
        .eventLoopGroup(group)
        .channelType(EpollDomainSocketChannel.class)
        .usePlaintext()
        .build();
    Metadata header = new Metadata();
    header.put(Metadata.Key.of("workload.spiffe.io", Metadata.ASCII_STRING_MARSHALLER), "true");
    SpiffeWorkloadAPIGrpc.SpiffeWorkloadAPIBlockingStub stub = SpiffeWorkloadAPIGrpc
        .newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(header));
    try {
      calls(stub, audience);
    } finally {
      channel.shutdownNow().awaitTermination(10, TimeUnit.SECONDS);
      group.shutdownGracefully(0, 1, TimeUnit.SECONDS);
    }
  }

  private static SpiffeWorkloadAPIGrpc.SpiffeWorkloadAPIBlockingStub timed(
      SpiffeWorkloadAPIGrpc.SpiffeWorkloadAPIBlockingStub stub) {
    return stub.withDeadlineAfter(TIMEOUT_SECONDS, TimeUnit.SECONDS);
  }

  /** The first message of a server stream, which is then cancelled. */
  private static <T> T first(java.util.function.Supplier<Iterator<T>> call) {
    Context.CancellableContext ctx = Context.current().withCancellation();
    try {
      return ctx.call(() -> call.get().next());
    } catch (RuntimeException e) {
      throw e;
    } catch (Exception e) {
      throw new IllegalStateException(e);
    } finally {
      ctx.cancel(null);
    }
  }

  private static void calls(SpiffeWorkloadAPIGrpc.SpiffeWorkloadAPIBlockingStub stub, String audience)
      throws Exception {
    Workload.X509SVIDResponse x509 =
        first(() -> timed(stub).fetchX509SVID(Workload.X509SVIDRequest.getDefaultInstance()));
    Workload.X509SVID svid = x509.getSvids(0);
    List<X509Certificate> chain = certificates(svid.getX509Svid());
    X509Certificate leaf = chain.get(0);
    String id = spiffeId(leaf);
    if (!id.equals(svid.getSpiffeId())) {
      throw new IllegalStateException("spiffe_id " + svid.getSpiffeId() + " but the leaf says " + id);
    }
    System.out.println("x509_svid " + id + " " + leaf.getSerialNumber().toString(16));
    checkKeyMatches(leaf, svid.getX509SvidKey());
    for (int i = 0; i + 1 < chain.size(); i++) {
      chain.get(i).verify(chain.get(i + 1).getPublicKey());
    }
    X509Certificate top = chain.get(chain.size() - 1);
    boolean chained = false;
    for (X509Certificate root : certificates(svid.getBundle())) {
      try {
        top.verify(root.getPublicKey());
        chained = true;
      } catch (Exception notThisRoot) {
        // try the next root
      }
    }
    if (!chained) {
      throw new IllegalStateException("the X509-SVID does not chain to its bundle");
    }
    System.out.println("x509_verified " + id);

    Workload.X509BundlesResponse x509Bundles =
        first(() -> timed(stub).fetchX509Bundles(Workload.X509BundlesRequest.getDefaultInstance()));
    for (Map.Entry<String, ByteString> e : x509Bundles.getBundlesMap().entrySet()) {
      System.out.println("x509_bundle " + trustDomain(e.getKey()) + " " + certificates(e.getValue()).size());
    }
    Workload.JWTBundlesResponse jwtBundles =
        first(() -> timed(stub).fetchJWTBundles(Workload.JWTBundlesRequest.getDefaultInstance()));
    for (Map.Entry<String, ByteString> e : jwtBundles.getBundlesMap().entrySet()) {
      Struct jwks = json(e.getValue().toStringUtf8());
      System.out.println("jwt_bundle " + trustDomain(e.getKey()) + " "
          + jwks.getFieldsOrThrow("keys").getListValue().getValuesCount());
    }

    Workload.JWTSVIDResponse jwt = timed(stub).fetchJWTSVID(
        Workload.JWTSVIDRequest.newBuilder().addAudience(audience).build());
    String token = jwt.getSvids(0).getSvid();
    String jwtId = jwt.getSvids(0).getSpiffeId();
    System.out.println("jwt_svid " + jwtId);
    ByteString jwksOfId = jwtBundles.getBundlesMap().get("spiffe://" + trustDomain(jwtId));
    if (jwksOfId == null) {
      throw new IllegalStateException("no JWT bundle for " + jwtId);
    }
    System.out.println("jwt_validated " + validateLocally(token, json(jwksOfId.toStringUtf8()), audience) + " local");
    Workload.ValidateJWTSVIDResponse validated = timed(stub).validateJWTSVID(
        Workload.ValidateJWTSVIDRequest.newBuilder().setAudience(audience).setSvid(token).build());
    System.out.println("jwt_validated " + validated.getSpiffeId() + " agent");
    try {
      timed(stub).validateJWTSVID(Workload.ValidateJWTSVIDRequest.newBuilder()
          .setAudience("another-audience").setSvid(token).build());
      throw new IllegalStateException("the agent validated the JWT-SVID for another audience");
    } catch (StatusRuntimeException e) {
      if (e.getStatus().getCode() != Status.Code.INVALID_ARGUMENT) {
        throw e;
      }
    }
    System.out.println("jwt_refused another-audience");
  }

  /** Concatenated DER certificates, as the Workload API sends chains and bundles. */
  private static List<X509Certificate> certificates(ByteString der) throws Exception {
    CertificateFactory cf = CertificateFactory.getInstance("X.509");
    List<X509Certificate> out = new ArrayList<>();
    for (java.security.cert.Certificate c : cf.generateCertificates(new ByteArrayInputStream(der.toByteArray()))) {
      out.add((X509Certificate) c);
    }
    if (out.isEmpty()) {
      throw new IllegalStateException("no certificate in the DER");
    }
    return out;
  }

  private static String spiffeId(X509Certificate leaf) throws Exception {
    String found = null;
    if (leaf.getSubjectAlternativeNames() != null) {
      for (List<?> san : leaf.getSubjectAlternativeNames()) {
        // 6: uniformResourceIdentifier
        if (Integer.valueOf(6).equals(san.get(0)) && san.get(1).toString().startsWith("spiffe://")) {
          if (found != null) {
            throw new IllegalStateException("more than one SPIFFE ID in the leaf");
          }
          found = san.get(1).toString();
        }
      }
    }
    if (found == null) {
      throw new IllegalStateException("no spiffe:// URI SAN in the leaf");
    }
    return found;
  }

  /** The PKCS#8 key signs what the leaf's public key verifies. */
  private static void checkKeyMatches(X509Certificate leaf, ByteString pkcs8) throws Exception {
    String alg = leaf.getPublicKey().getAlgorithm();
    PrivateKey key = KeyFactory.getInstance(alg).generatePrivate(new PKCS8EncodedKeySpec(pkcs8.toByteArray()));
    String sigAlg = alg.equals("EC") ? "SHA256withECDSA" : "SHA256withRSA";
    byte[] msg = "sigil".getBytes(StandardCharsets.UTF_8);
    Signature s = Signature.getInstance(sigAlg);
    s.initSign(key);
    s.update(msg);
    byte[] sig = s.sign();
    Signature v = Signature.getInstance(sigAlg);
    v.initVerify(leaf.getPublicKey());
    v.update(msg);
    if (!v.verify(sig)) {
      throw new IllegalStateException("the X509-SVID key does not match its leaf");
    }
  }

  private static String trustDomain(String spiffeId) {
    String rest = spiffeId.replaceFirst("^spiffe://", "");
    int slash = rest.indexOf('/');
    return slash < 0 ? rest : rest.substring(0, slash);
  }

  private static Struct json(String text) throws Exception {
    Struct.Builder b = Struct.newBuilder();
    JsonFormat.parser().merge(text, b);
    return b.build();
  }

  private static byte[] b64url(String s) {
    return Base64.getUrlDecoder().decode(s);
  }

  /** Verifies the JWT-SVID with the JWKS key its header names, then its audience and expiry. */
  private static String validateLocally(String token, Struct jwks, String audience) throws Exception {
    String[] parts = token.split("\\.");
    if (parts.length != 3) {
      throw new IllegalStateException("not a JWS compact token");
    }
    Struct header = json(new String(b64url(parts[0]), StandardCharsets.UTF_8));
    Struct claims = json(new String(b64url(parts[1]), StandardCharsets.UTF_8));
    String alg = header.getFieldsOrThrow("alg").getStringValue();
    String kid = header.getFieldsOrThrow("kid").getStringValue();
    Struct jwk = null;
    for (Value k : jwks.getFieldsOrThrow("keys").getListValue().getValuesList()) {
      if (kid.equals(k.getStructValue().getFieldsOrDefault("kid", Value.getDefaultInstance()).getStringValue())) {
        jwk = k.getStructValue();
      }
    }
    if (jwk == null) {
      throw new IllegalStateException("no JWT authority with kid " + kid + " in the bundle");
    }
    Signature sig;
    switch (alg) {
      case "ES256" -> sig = Signature.getInstance("SHA256withECDSAinP1363Format");
      case "ES384" -> sig = Signature.getInstance("SHA384withECDSAinP1363Format");
      case "RS256" -> sig = Signature.getInstance("SHA256withRSA");
      default -> throw new IllegalStateException("unsupported alg " + alg);
    }
    sig.initVerify(publicKey(jwk));
    sig.update((parts[0] + "." + parts[1]).getBytes(StandardCharsets.US_ASCII));
    if (!sig.verify(b64url(parts[2]))) {
      throw new IllegalStateException("bad JWT signature");
    }
    Value aud = claims.getFieldsOrThrow("aud");
    boolean audOk = aud.hasListValue()
        ? aud.getListValue().getValuesList().stream().anyMatch(v -> v.getStringValue().equals(audience))
        : aud.getStringValue().equals(audience);
    if (!audOk) {
      throw new IllegalStateException("the JWT-SVID is not for audience " + audience);
    }
    if (claims.getFieldsOrThrow("exp").getNumberValue() <= System.currentTimeMillis() / 1000.0) {
      throw new IllegalStateException("the JWT-SVID has expired");
    }
    return claims.getFieldsOrThrow("sub").getStringValue();
  }

  private static PublicKey publicKey(Struct jwk) throws Exception {
    String kty = jwk.getFieldsOrThrow("kty").getStringValue();
    if (kty.equals("EC")) {
      String crv = jwk.getFieldsOrThrow("crv").getStringValue();
      String curve = switch (crv) {
        case "P-256" -> "secp256r1";
        case "P-384" -> "secp384r1";
        default -> throw new IllegalStateException("unsupported curve " + crv);
      };
      AlgorithmParameters params = AlgorithmParameters.getInstance("EC");
      params.init(new ECGenParameterSpec(curve));
      ECPoint point = new ECPoint(
          new BigInteger(1, b64url(jwk.getFieldsOrThrow("x").getStringValue())),
          new BigInteger(1, b64url(jwk.getFieldsOrThrow("y").getStringValue())));
      return KeyFactory.getInstance("EC").generatePublic(
          new ECPublicKeySpec(point, params.getParameterSpec(ECParameterSpec.class)));
    }
    if (kty.equals("RSA")) {
      return KeyFactory.getInstance("RSA").generatePublic(new RSAPublicKeySpec(
          new BigInteger(1, b64url(jwk.getFieldsOrThrow("n").getStringValue())),
          new BigInteger(1, b64url(jwk.getFieldsOrThrow("e").getStringValue()))));
    }
    throw new IllegalStateException("unsupported key type " + kty);
  }
}
