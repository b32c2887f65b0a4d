'use strict';
// Runs one Vault client scenario with node-vault and prints its outcome as one JSON document.
//
// Usage: node node_vault_scenario.js SCENARIO SECRET_PATH
//
// SCENARIO is `kv` (KV v2 round trip, token lookup, namespace, response wrapping, health) or
// `redirect` (requests against a standby that responds with 307). SECRET_PATH is the KV v2 path
// under the `secret/` mount. The client is configured the way a pod would be: VAULT_ADDR,
// VAULT_CACERT and VAULT_TOKEN come from the environment. hvac_scenario.py does the same steps
// with hvac, and test_vault_clients.py checks both outputs.

const fs = require('fs');
const path = require('path');

// node-vault sends its requests through an axios instance that it creates from axios.defaults
// when a client is made. axios follows up to 21 redirects by default, to any host, and reads
// proxy settings from the environment, and test traffic must do neither. The axios module is
// resolved from node-vault's own folder, so these defaults are the ones node-vault reads.
const nodeVaultDir = path.dirname(require.resolve('node-vault'));
const axios = require(require.resolve('axios', { paths: [nodeVaultDir] }));
axios.defaults.maxRedirects = 0;
axios.defaults.proxy = false;

const nodeVault = require('node-vault');

const NAMESPACE = 'team-a/';
const WRAP_TTL = '60s';
const SECRET = { username: 'app', password: 's3cr3t-from-node-vault' };
const TIMEOUT_MS = 30000;

function makeClient(namespace) {
  return nodeVault({
    apiVersion: 'v1',
    endpoint: process.env.VAULT_ADDR,
    token: process.env.VAULT_TOKEN,
    namespace,
    requestOptions: { ca: fs.readFileSync(process.env.VAULT_CACERT), timeout: TIMEOUT_MS },
  });
}

// Runs CALL and describes what the client returned or raised.
async function describe(call) {
  try {
    return { outcome: 'value', value: await call() };
  } catch (error) {
    const response = error.response || {};
    return {
      outcome: 'error',
      error: error.constructor.name,
      message: String(error.message).slice(0, 300),
      status: response.statusCode === undefined ? null : response.statusCode,
    };
  }
}

async function runKv(secretPath) {
  const vault = makeClient();
  const folder = secretPath.slice(0, secretPath.lastIndexOf('/'));
  const leaf = secretPath.slice(secretPath.lastIndexOf('/') + 1);
  const output = {};

  const health = await vault.health({ standbyok: true });
  output.health = {
    initialized: health.initialized,
    sealed: health.sealed,
    standby: health.standby,
  };

  const written = await vault.write(`secret/data/${secretPath}`, { data: SECRET });
  output.write_version = written.data.version;
  output.read_data = (await vault.read(`secret/data/${secretPath}`)).data.data;
  output.list_keys = (await vault.list(`secret/metadata/${folder}`)).data.keys;
  output.list_leaf = leaf;
  const metadata = (await vault.read(`secret/metadata/${secretPath}`)).data;
  output.metadata_current_version = metadata.current_version;
  output.metadata_versions = Object.keys(metadata.versions).sort();

  const lookup = (await vault.tokenLookupSelf()).data;
  output.lookup_self = { id: lookup.id, policies: lookup.policies };

  const namespaced = makeClient(NAMESPACE);
  const echo = await namespaced.read('test/echo?client=node-vault');
  output.namespace_echo = echo.headers
    .filter(([name]) => name.toLowerCase() === 'x-vault-namespace')
    .map(([, value]) => value);

  const wrapped = await vault.read(`secret/data/${secretPath}`, {
    headers: { 'X-Vault-Wrap-TTL': WRAP_TTL },
  });
  const wrapInfo = wrapped.wrap_info;
  output.wrap_info = {
    ttl: wrapInfo.ttl,
    creation_path: wrapInfo.creation_path,
    has_token: Boolean(wrapInfo.token),
    data: wrapped.data,
  };
  const unwrapped = await vault.unwrap({ token: wrapInfo.token });
  output.unwrapped_data = unwrapped.data.data;

  // node-vault resolves only for 200 and 204, with the body alone. A 204 has an empty body.
  const deleted = await describe(() => vault.delete(`secret/data/${secretPath}`));
  if (deleted.outcome === 'value') {
    output.delete_status = deleted.value === '' ? 204 : 200;
  } else {
    output.delete_status = deleted.status;
  }
  const after = await describe(() => vault.read(`secret/data/${secretPath}`));
  output.read_after_delete = after.status;
  return output;
}

async function runRedirect(secretPath) {
  const vault = makeClient();
  return {
    health_standbyok: await describe(() => vault.health({ standbyok: true })),
    health: await describe(() => vault.health()),
    read: await describe(() => vault.read(`secret/data/${secretPath}`)),
    write: await describe(() => vault.write(`secret/data/${secretPath}`, { data: SECRET })),
  };
}

async function main(argv) {
  const [scenario, secretPath] = argv;
  if (argv.length !== 2 || !['kv', 'redirect'].includes(scenario)) {
    process.stderr.write('usage: node node_vault_scenario.js kv|redirect SECRET_PATH\n');
    return 2;
  }
  const output = scenario === 'kv' ? await runKv(secretPath) : await runRedirect(secretPath);
  process.stdout.write(`${JSON.stringify(output)}\n`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    const response = error.response ? ` (status ${error.response.statusCode})` : '';
    process.stderr.write(`node-vault scenario failed: ${error.stack || error}${response}\n`);
    process.exitCode = 1;
  },
);
