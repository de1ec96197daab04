package chap

import (
	"bytes"
	"crypto/md5"
	"fmt"
	"testing"
)

func TestAlgorithmNamesRoundTrip(t *testing.T) {
	for _, a := range DefaultAlgorithms {
		for _, spelling := range []string{a.String(), " " + a.String() + " "} {
			if got, err := ParseAlgorithm(spelling); err != nil || got != a {
				t.Errorf("ParseAlgorithm(%q) = %v, %v", spelling, got, err)
			}
		}
	}
	for in, want := range map[string]Algorithm{"md5": MD5, "SHA1": SHA1, "sha256": SHA256, "sha3-256": SHA3_256, "SHA3256": SHA3_256} {
		if got, err := ParseAlgorithm(in); err != nil || got != want {
			t.Errorf("ParseAlgorithm(%q) = %v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "SHA-512", "MD4", "5"} {
		if _, err := ParseAlgorithm(bad); err == nil {
			t.Errorf("ParseAlgorithm(%q) accepted", bad)
		}
	}
	if Algorithm(9).Known() || Algorithm(9).String() != "CHAP-algorithm-9" {
		t.Error("unknown algorithm")
	}
}

func TestResponseIsTheDigestOfIdentifierSecretAndChallenge(t *testing.T) {
	s := NewSecret([]byte("twelve bytes!"))
	c := []byte{1, 2, 3}
	want := md5.Sum(append(append([]byte{7}, "twelve bytes!"...), c...))
	if got := MD5.Response(7, s, c); !bytes.Equal(got, want[:]) {
		t.Fatalf("MD5 response %x, want %x", got, want)
	}
	for _, a := range DefaultAlgorithms {
		r := a.Response(7, s, c)
		if len(r) != a.Size() || a.ChallengeLen() < 16 || !a.Verify(7, s, c, r) || a.Verify(8, s, c, r) || a.Verify(7, s, c, r[:len(r)-1]) {
			t.Errorf("%v: size %d, challenge %d, or Verify wrong", a, len(r), a.ChallengeLen())
		}
	}
}

func TestChooseFollowsTheTargetsPreference(t *testing.T) {
	c := &Credentials{}
	if a, ok := c.Choose([]Algorithm{MD5, SHA256}); !ok || a != SHA256 {
		t.Fatalf("default prefs chose %v", a)
	}
	c.Algorithms = []Algorithm{MD5, SHA256}
	if a, ok := c.Choose([]Algorithm{SHA256, MD5}); !ok || a != MD5 {
		t.Fatalf("configured prefs chose %v", a)
	}
	if _, ok := c.Choose([]Algorithm{SHA1}); ok {
		t.Fatal("chose an algorithm not allowed")
	}
}

func TestSecretRedactsAndComparesByValue(t *testing.T) {
	a, b := NewSecret([]byte("same secret!")), NewSecret([]byte("same secret!"))
	if !a.Equal(b) || a.Equal(NewSecret([]byte("other secret"))) || (Secret{}).Equal(Secret{}) {
		t.Fatal("Equal")
	}
	for _, out := range []string{fmt.Sprint(a), fmt.Sprintf("%#v %+v %x %q %d", a, a, a, a, a), a.String()} {
		if bytes.Contains([]byte(out), []byte("same")) {
			t.Fatalf("secret printed: %s", out)
		}
	}
	j, _ := a.MarshalJSON()
	if string(j) != `"[redacted]"` {
		t.Fatalf("JSON %s", j)
	}
}

func TestCredentialsEqualComparesSecretsByValue(t *testing.T) {
	mk := func(secret, mutual string, algs ...Algorithm) *Credentials {
		c := &Credentials{User: "u", Secret: NewSecret([]byte(secret)), Algorithms: algs}
		if mutual != "" {
			c.MutualUser, c.MutualSecret = "m", NewSecret([]byte(mutual))
		}
		return c
	}
	a := mk("secret-one-12", "mutual-one-12", MD5)
	if !a.Equal(mk("secret-one-12", "mutual-one-12", MD5)) || !(*Credentials)(nil).Equal(nil) {
		t.Fatal("equal credentials differ")
	}
	for _, b := range []*Credentials{nil, mk("secret-two-12", "mutual-one-12", MD5), mk("secret-one-12", "", MD5),
		mk("secret-one-12", "mutual-one-12", SHA256), mk("secret-one-12", "mutual-one-12")} {
		if a.Equal(b) {
			t.Fatalf("different credentials equal: %+v", b)
		}
	}
}
