// A sample scale set to break and watch heal: three Ubuntu VMs serving a tiny app on
// 127.0.0.1:8080 (/healthz), each running the Linux heartbeat agent against the healer's topic —
// and the healer itself (main.bicep), watching this scale set, in one deployment.
//
//   az deployment group create -g <rg> -f infra/sample/sample.bicep -p sshPublicKey="$(cat ~/.ssh/id_ed25519.pub)"
//
// See README.md next to this file for deploying the code and breaking a VM.
targetScope = 'resourceGroup'

param location string = resourceGroup().location
@description('The healer\'s name prefix (main.bicep `name`).')
param name string = 'vmsshealer'
param adminUsername string = 'azureuser'
param sshPublicKey string
param capacity int = 3
param vmSize string = 'Standard_B2s'

// main.bicep names its topic deterministically; the VMs need its endpoint in their custom data
// before the topic exists (the agent retries until it does).
var suffix = uniqueString(resourceGroup().id, name)
var topicEndpoint = 'https://${name}-heartbeats-${suffix}.${location}-1.eventgrid.azure.net/api/events'

var cloudInit = join([
  '#cloud-config'
  'write_files:'
  '  - path: /opt/vmss-healer/vmss-healer-agent'
  '    encoding: b64'
  '    permissions: "0755"'
  '    content: ${base64(loadTextContent('../agent/vmss-healer-agent'))}'
  '  - path: /opt/vmss-healer/vmss-healer-agent.service'
  '    encoding: b64'
  '    content: ${base64(loadTextContent('../agent/vmss-healer-agent.service'))}'
  '  - path: /opt/vmss-healer/install.sh'
  '    encoding: b64'
  '    permissions: "0755"'
  '    content: ${base64(loadTextContent('../agent/install.sh'))}'
  '  - path: /srv/sample/healthz'
  '    content: ok'
  '  - path: /etc/systemd/system/sample-app.service'
  '    content: |'
  '      [Unit]'
  '      Description=vmss-healer sample app: serves /healthz on 127.0.0.1:8080'
  '      [Service]'
  '      ExecStartPre=/bin/sh -c "echo ok > /srv/sample/healthz"'
  '      ExecStart=/usr/bin/python3 -m http.server 8080 --bind 127.0.0.1 --directory /srv/sample'
  '      Restart=always'
  '      [Install]'
  '      WantedBy=multi-user.target'
  'runcmd:'
  '  - systemctl daemon-reload'
  '  - systemctl enable --now sample-app.service'
  // Before the platform terminates (or reboots, redeploys) a VM, its agent drains it: /healthz
  // goes (a load balancer's probe on it stops sending requests), then the event is approved. The
  // app puts the file back when it starts again (ExecStartPre).
  '  - bash /opt/vmss-healer/install.sh --topic ${topicEndpoint} --health-url http://127.0.0.1:8080/healthz --drain-command "rm -f /srv/sample/healthz"'
], '\n')

resource vnet 'Microsoft.Network/virtualNetworks@2024-01-01' = {
  name: '${name}-sample-vnet'
  location: location
  properties: {
    addressSpace: { addressPrefixes: ['10.42.0.0/16'] }
    subnets: [
      {
        name: 'vms'
        properties: { addressPrefix: '10.42.0.0/24', defaultOutboundAccess: true }
      }
    ]
  }
}

resource scaleSet 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = {
  name: '${name}-sample'
  location: location
  sku: { name: vmSize, tier: 'Standard', capacity: capacity }
  identity: { type: 'SystemAssigned' }
  properties: {
    orchestrationMode: 'Uniform'
    upgradePolicy: { mode: 'Manual' }
    overprovision: false
    virtualMachineProfile: {
      // Terminate notifications: a deleted instance gets five minutes' notice as a scheduled event,
      // which its agent drains for and approves ("Terminate notification for Azure Virtual Machine
      // Scale Set instances": notBeforeTimeout PT5M to PT15M). The healer's delete steps time out
      // only after this window.
      scheduledEventsProfile: {
        terminateNotificationProfile: { enable: true, notBeforeTimeout: 'PT5M' }
      }
      osProfile: {
        computerNamePrefix: 'sample'
        adminUsername: adminUsername
        customData: base64(cloudInit)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: {
            publicKeys: [
              { path: '/home/${adminUsername}/.ssh/authorized_keys', keyData: sshPublicKey }
            ]
          }
        }
      }
      storageProfile: {
        osDisk: { createOption: 'FromImage', managedDisk: { storageAccountType: 'Standard_LRS' } }
        imageReference: {
          publisher: 'Canonical'
          offer: '0001-com-ubuntu-server-jammy'
          sku: '22_04-lts-gen2'
          version: 'latest'
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [
                { name: 'ip', properties: { subnet: { id: vnet.properties.subnets[0].id } } }
              ]
            }
          }
        ]
      }
    }
  }
}

// The healer, watching this scale set; the VMs' identity may publish heartbeats.
module healer '../main.bicep' = {
  name: 'vmss-healer'
  params: {
    name: name
    location: location
    watchedScaleSets: [{ id: scaleSet.id, overrides: '' }]
    senderPrincipalIds: [scaleSet.identity.principalId]
    // The sample heals for real; a production first run starts in dry run.
    dryRun: false
  }
}

output SCALE_SET_ID string = scaleSet.id
// Everything infra/hooks/postdeploy.sh reads from azd's environment (tests/infra.rs checks it):
// without them `azd up` of the sample would subscribe nothing, and the healer would run on a
// silent fleet.
output FUNCTION_APP_NAME string = healer.outputs.FUNCTION_APP_NAME
output HEARTBEAT_TOPIC_ENDPOINT string = healer.outputs.HEARTBEAT_TOPIC_ENDPOINT
output HEARTBEAT_TOPIC_NAME string = healer.outputs.HEARTBEAT_TOPIC_NAME
output STORAGE_ACCOUNT_NAME string = healer.outputs.STORAGE_ACCOUNT_NAME
output SYSTEM_TOPICS array = healer.outputs.SYSTEM_TOPICS
