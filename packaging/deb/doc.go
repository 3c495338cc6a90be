// Package deb owns the Debian package of vmshadow: the systemd unit of
// vmshadow server, the maintainer scripts and the copyright statement in
// this directory, which scripts/package-deb.sh (run by 'make package')
// assembles with the binary, the sample configuration, and the man pages
// and shell completions the binary generates. Its tests build the package
// and check what it holds, that the unit verifies, that the man pages and
// completions work, and what the maintainer scripts do in a throwaway root.
package deb
