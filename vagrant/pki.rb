# One PKI for the lab's three nodes, made on the Vagrant host before the
# first `vagrant up` so that the synced folder carries the same CA to every
# node: a CA and, per node, a certificate as `remora certs issue` makes it
# (ECDSA P-256, CN and DNS SAN the node's name, its IP, server and client
# auth). A lab shortcut: in production each host gets its key from your PKI
# and the CA's key stays off the hosts.
require "fileutils"
require "openssl"

module RemoraLabPKI
  def self.ensure(dir, nodes)
    FileUtils.mkdir_p(dir, mode: 0o700)
    ca_crt, ca_key_path = File.join(dir, "ca.crt"), File.join(dir, "ca.key")
    if File.exist?(ca_crt)
      ca = OpenSSL::X509::Certificate.new(File.read(ca_crt))
      ca_key = OpenSSL::PKey.read(File.read(ca_key_path))
    else
      ca_key = OpenSSL::PKey::EC.generate("prime256v1")
      ca = cert(OpenSSL::X509::Name.parse("/O=remora/CN=remora lab CA"), ca_key, 10 * 365)
      ca.issuer = ca.subject
      ext = OpenSSL::X509::ExtensionFactory.new(ca, ca)
      ca.add_extension(ext.create_extension("basicConstraints", "CA:TRUE,pathlen:0", true))
      ca.add_extension(ext.create_extension("keyUsage", "keyCertSign,cRLSign,digitalSignature", true))
      ca.add_extension(ext.create_extension("subjectKeyIdentifier", "hash"))
      ca.sign(ca_key, OpenSSL::Digest.new("SHA256"))
      write(ca_key_path, ca_key.to_pem, 0o600)
      write(ca_crt, ca.to_pem, 0o644)
    end
    nodes.each do |name, ip|
      next if File.exist?(File.join(dir, "#{name}.crt"))
      key = OpenSSL::PKey::EC.generate("prime256v1")
      c = cert(OpenSSL::X509::Name.parse("/O=remora/CN=#{name}"), key, 365)
      c.issuer = ca.subject
      ext = OpenSSL::X509::ExtensionFactory.new(ca, c)
      c.add_extension(ext.create_extension("basicConstraints", "CA:FALSE", true))
      c.add_extension(ext.create_extension("keyUsage", "digitalSignature", true))
      c.add_extension(ext.create_extension("extendedKeyUsage", "serverAuth,clientAuth"))
      c.add_extension(ext.create_extension("subjectAltName", "DNS:#{name},IP:#{ip}"))
      c.add_extension(ext.create_extension("authorityKeyIdentifier", "keyid"))
      c.sign(ca_key, OpenSSL::Digest.new("SHA256"))
      write(File.join(dir, "#{name}.key"), key.to_pem, 0o600)
      write(File.join(dir, "#{name}.crt"), c.to_pem, 0o644)
    end
  end

  def self.cert(subject, key, days)
    c = OpenSSL::X509::Certificate.new
    c.version = 2
    c.serial = OpenSSL::BN.rand(127)
    c.subject = subject
    c.public_key = key
    c.not_before = Time.now - 3600
    c.not_after = Time.now + days * 86_400
    c
  end

  def self.write(path, data, mode)
    File.open(path, File::WRONLY | File::CREAT | File::TRUNC, mode) { |f| f.write(data) }
  end
end
