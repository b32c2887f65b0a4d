// SPDX-License-Identifier: Apache-2.0
// `taser certs`: a CA, a broker certificate and a bridge certificate for a first try.
#pragma once

namespace taser::tls {

// Parses the options of `taser certs` and writes the files; returns the exit code.
int certs_main(int argc, char** argv);

}  // namespace taser::tls
