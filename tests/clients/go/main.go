// Command sigil-go-client is a SPIFFE workload written with go-spiffe v2, run by
// tests/clients_e2e.rs against a real sigil-agent. Like any go-spiffe program it finds the agent
// through SPIFFE_ENDPOINT_SOCKET (unix:///path/to/api.sock).
//
//	sigil-go-client fetch [-audience A]
//	    X509Source (first message of the stream), X.509 and JWT bundles, a JWT-SVID validated
//	    locally against the JWT bundles and by the agent, and refused for another audience.
//	sigil-go-client serve -authorize ID
//	    spiffetls mTLS server on 127.0.0.1 (a free port) accepting only the client ID; answers
//	    one line per connection; exits when its stdin closes.
//	sigil-go-client dial -address HOST:PORT -expect ID
//	    spiffetls mTLS client: one exchange with a server that must be ID. Exits 2 (after an
//	    "mtls_refused" line) when the handshake is refused.
//
// Every result is one line on stdout, `<what> <values...>`, for the test to check.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Generous: CI machines are small and loaded.
const timeout = 90 * time.Second

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: sigil-go-client fetch|serve|dial [flags]"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var err error
	switch os.Args[1] {
	case "fetch":
		err = fetch(ctx, os.Args[2:])
	case "serve":
		// The server lives until the test closes its stdin, not for `timeout`.
		err = serve(context.Background(), os.Args[2:])
	case "dial":
		err = dial(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: fetch, serve or dial", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "sigil-go-client:", err)
	os.Exit(1)
}

// x509Source opens the X.509 watch and prints the first SVID it delivered.
func x509Source(ctx context.Context) (*workloadapi.X509Source, *x509svid.SVID, error) {
	source, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("X509Source: %w", err)
	}
	svid, err := source.GetX509SVID()
	if err != nil {
		source.Close()
		return nil, nil, fmt.Errorf("X509Source SVID: %w", err)
	}
	fmt.Printf("x509_svid %s %s\n", svid.ID, svid.Certificates[0].SerialNumber.Text(16))
	return source, svid, nil
}

func fetch(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("fetch", flag.ExitOnError)
	audience := fs.String("audience", "sigil-e2e", "JWT-SVID audience")
	_ = fs.Parse(args)

	source, svid, err := x509Source(ctx)
	if err != nil {
		return err
	}
	defer source.Close()
	// The SVID chains to the bundle the same stream delivered.
	id, _, err := x509svid.Verify(svid.Certificates, source)
	if err != nil {
		return fmt.Errorf("verifying the X509-SVID against its bundle: %w", err)
	}
	fmt.Printf("x509_verified %s\n", id)

	x509Bundles, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		return fmt.Errorf("FetchX509Bundles: %w", err)
	}
	for _, b := range x509Bundles.Bundles() {
		fmt.Printf("x509_bundle %s %d\n", b.TrustDomain(), len(b.X509Authorities()))
	}
	jwtBundles, err := workloadapi.FetchJWTBundles(ctx)
	if err != nil {
		return fmt.Errorf("FetchJWTBundles: %w", err)
	}
	for _, b := range jwtBundles.Bundles() {
		fmt.Printf("jwt_bundle %s %d\n", b.TrustDomain(), len(b.JWTAuthorities()))
	}

	jwt, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: *audience})
	if err != nil {
		return fmt.Errorf("FetchJWTSVID: %w", err)
	}
	token := jwt.Marshal()
	fmt.Printf("jwt_svid %s\n", jwt.ID)
	local, err := jwtsvid.ParseAndValidate(token, jwtBundles, []string{*audience})
	if err != nil {
		return fmt.Errorf("validating the JWT-SVID locally: %w", err)
	}
	fmt.Printf("jwt_validated %s local\n", local.ID)
	byAgent, err := workloadapi.ValidateJWTSVID(ctx, token, *audience)
	if err != nil {
		return fmt.Errorf("ValidateJWTSVID: %w", err)
	}
	fmt.Printf("jwt_validated %s agent\n", byAgent.ID)

	// Another audience: refused both ways.
	if _, err := jwtsvid.ParseAndValidate(token, jwtBundles, []string{"another-audience"}); err == nil {
		return errors.New("the JWT-SVID validated locally for another audience")
	}
	if _, err := workloadapi.ValidateJWTSVID(ctx, token, "another-audience"); err == nil {
		return errors.New("the agent validated the JWT-SVID for another audience")
	}
	fmt.Println("jwt_refused another-audience")
	return nil
}

func serve(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	authorize := fs.String("authorize", "", "the only client SPIFFE ID accepted")
	_ = fs.Parse(args)
	clientID, err := spiffeid.FromString(*authorize)
	if err != nil {
		return fmt.Errorf("-authorize: %w", err)
	}

	startCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	source, _, err := x509Source(startCtx)
	if err != nil {
		return err
	}
	defer source.Close()
	mode := spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(clientID), source)
	ln, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0", mode)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	defer ln.Close()
	fmt.Printf("listening %s\n", ln.Addr())

	// The test stops the server by closing its stdin.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accepting: %w", err)
		}
		go answer(conn)
	}
}

// answer reads one line from an mTLS client and greets it by its SPIFFE ID.
func answer(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		fmt.Printf("handshake_failed %s\n", oneLine(err))
		return
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fmt.Printf("read_failed %s %s\n", peer, oneLine(err))
		return
	}
	fmt.Fprintf(conn, "hello %s, you said %s\n", peer, strings.TrimSpace(line))
	fmt.Printf("served %s\n", peer)
}

func dial(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("dial", flag.ExitOnError)
	address := fs.String("address", "", "server HOST:PORT")
	expect := fs.String("expect", "", "the server's SPIFFE ID")
	_ = fs.Parse(args)
	serverID, err := spiffeid.FromString(*expect)
	if err != nil {
		return fmt.Errorf("-expect: %w", err)
	}

	source, _, err := x509Source(ctx)
	if err != nil {
		return err
	}
	defer source.Close()
	mode := spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(serverID), source)
	conn, err := spiffetls.DialWithMode(ctx, "tcp", *address, mode)
	if err != nil {
		fmt.Printf("mtls_refused %s\n", oneLine(err))
		os.Exit(2)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		return fmt.Errorf("server ID: %w", err)
	}
	fmt.Printf("mtls_peer %s\n", peer)
	if _, err := fmt.Fprintln(conn, "ping"); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	fmt.Printf("mtls_reply %s\n", strings.TrimSpace(reply))
	return nil
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", " ")
}
