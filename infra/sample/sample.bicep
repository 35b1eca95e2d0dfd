// A sample to break and watch heal, and to release a new version with no lost request: two
// scale sets of Ubuntu VMs (blue serving, green at zero) behind one Standard load balancer that
// probes each VM's app (/healthz on port 8080), each VM running the Linux heartbeat agent against
// the healer's topic — and the healer itself (main.bicep), watching both, in one deployment.
//
//   az deployment group create -g <rg> -f infra/sample/sample.bicep -p sshPublicKey="$(cat ~/.ssh/id_ed25519.pub)"
//
// See README.md next to this file for deploying the code, breaking a VM and swapping blue to green.
targetScope = 'resourceGroup'

param location string = resourceGroup().location
@description('The healer\'s name prefix (main.bicep `name`).')
param name string = 'vmsshealer'
param adminUsername string = 'azureuser'
param sshPublicKey string
param capacity int = 3
param vmSize string = 'Standard_B2s'

// Blue serves at `capacity`; green waits at zero for `handler swap`.
var colors = ['blue', 'green']

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
  '      Description=vmss-healer sample app: serves /healthz on port 8080 (the load balancer probes it)'
  '      [Service]'
  '      ExecStartPre=/bin/sh -c "echo ok > /srv/sample/healthz"'
  '      ExecStart=/usr/bin/python3 -m http.server 8080 --directory /srv/sample'
  '      Restart=always'
  '      [Install]'
  '      WantedBy=multi-user.target'
  'runcmd:'
  '  - systemctl daemon-reload'
  '  - systemctl enable --now sample-app.service'
  // Before the platform terminates (or reboots, redeploys) a VM, its agent drains it: /healthz
  // goes, the load balancer's probe on it fails and new requests go elsewhere, then the event is
  // approved. The app puts the file back when it starts again (ExecStartPre).
  '  - bash /opt/vmss-healer/install.sh --topic ${topicEndpoint} --health-url http://127.0.0.1:8080/healthz --drain-command "rm -f /srv/sample/healthz"'
], '\n')

// A Standard load balancer and its public address are closed to inbound traffic unless a
// network security group opens it: the app's port, from the Internet (the probe comes from
// AzureLoadBalancer, which the default rules allow).
resource nsg 'Microsoft.Network/networkSecurityGroups@2024-01-01' = {
  name: '${name}-sample-nsg'
  location: location
  properties: {
    securityRules: [
      {
        name: 'app'
        properties: {
          priority: 100
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'Internet'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '8080'
        }
      }
    ]
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2024-01-01' = {
  name: '${name}-sample-vnet'
  location: location
  properties: {
    addressSpace: { addressPrefixes: ['10.42.0.0/16'] }
    subnets: [
      {
        name: 'vms'
        properties: {
          addressPrefix: '10.42.0.0/24'
          networkSecurityGroup: { id: nsg.id }
        }
      }
    ]
  }
}

resource address 'Microsoft.Network/publicIPAddresses@2024-01-01' = {
  name: '${name}-sample-ip'
  location: location
  sku: { name: 'Standard' }
  properties: { publicIPAllocationMethod: 'Static' }
}

var lbName = '${name}-sample-lb'

// Both sets are in one backend pool: during a swap both serve, and what the probe sees failing
// (a draining VM's /healthz gone, or an app that is down) gets no new requests.
resource lb 'Microsoft.Network/loadBalancers@2024-01-01' = {
  name: lbName
  location: location
  sku: { name: 'Standard', tier: 'Regional' }
  properties: {
    frontendIPConfigurations: [
      { name: 'front', properties: { publicIPAddress: { id: address.id } } }
    ]
    backendAddressPools: [{ name: 'app' }]
    probes: [
      {
        name: 'healthz'
        properties: {
          protocol: 'Http'
          port: 8080
          requestPath: '/healthz'
          intervalInSeconds: 5
          probeThreshold: 2
        }
      }
    ]
    loadBalancingRules: [
      {
        name: 'http'
        properties: {
          protocol: 'Tcp'
          frontendPort: 80
          backendPort: 8080
          frontendIPConfiguration: { id: resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', lbName, 'front') }
          backendAddressPool: { id: resourceId('Microsoft.Network/loadBalancers/backendAddressPools', lbName, 'app') }
          probe: { id: resourceId('Microsoft.Network/loadBalancers/probes', lbName, 'healthz') }
          disableOutboundSnat: true
        }
      }
    ]
    // The VMs reach the heartbeat topic and the package mirrors through the load balancer's
    // address: a backend pool member gets no default outbound access.
    outboundRules: [
      {
        name: 'out'
        properties: {
          protocol: 'All'
          frontendIPConfigurations: [
            { id: resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', lbName, 'front') }
          ]
          backendAddressPool: { id: resourceId('Microsoft.Network/loadBalancers/backendAddressPools', lbName, 'app') }
        }
      }
    ]
  }
}

resource scaleSets 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = [for (color, i) in colors: {
  name: '${name}-sample-${color}'
  location: location
  sku: { name: vmSize, tier: 'Standard', capacity: i == 0 ? capacity : 0 }
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
        computerNamePrefix: color
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
                {
                  name: 'ip'
                  properties: {
                    subnet: { id: vnet.properties.subnets[0].id }
                    loadBalancerBackendAddressPools: [{ id: lb.properties.backendAddressPools[0].id }]
                  }
                }
              ]
            }
          }
        ]
      }
    }
  }
}]

// Blue's autoscale: CPU-driven between 2 and 6 instances. `handler swap` gives green a setting
// with these profiles and disables this one (a setting's target cannot change).
resource blueAutoscale 'Microsoft.Insights/autoscalesettings@2022-10-01' = {
  name: '${name}-sample-blue-autoscale'
  location: location
  properties: {
    enabled: true
    targetResourceUri: scaleSets[0].id
    profiles: [
      {
        name: 'cpu'
        capacity: { minimum: '2', maximum: '6', default: string(capacity) }
        rules: [
          {
            metricTrigger: {
              metricName: 'Percentage CPU'
              metricResourceUri: scaleSets[0].id
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: 'PT5M'
              timeAggregation: 'Average'
              operator: 'GreaterThan'
              threshold: 70
            }
            scaleAction: { direction: 'Increase', type: 'ChangeCount', value: '1', cooldown: 'PT5M' }
          }
          {
            metricTrigger: {
              metricName: 'Percentage CPU'
              metricResourceUri: scaleSets[0].id
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: 'PT10M'
              timeAggregation: 'Average'
              operator: 'LessThan'
              threshold: 20
            }
            scaleAction: { direction: 'Decrease', type: 'ChangeCount', value: '1', cooldown: 'PT10M' }
          }
        ]
      }
    ]
  }
}

// The healer, watching both scale sets; the VMs' identities may publish heartbeats; swaps allowed.
module healer '../main.bicep' = {
  name: 'vmss-healer'
  params: {
    name: name
    location: location
    watchedScaleSets: [for (color, i) in colors: { id: scaleSets[i].id, overrides: '' }]
    senderPrincipalIds: [for (color, i) in colors: scaleSets[i].identity.principalId]
    enableSwap: true
    // The sample heals for real; a production first run starts in dry run.
    dryRun: false
  }
}

output SCALE_SET_ID string = scaleSets[0].id
output GREEN_SCALE_SET_ID string = scaleSets[1].id
output APP_URL string = 'http://${address.properties.ipAddress}/healthz'
// Everything infra/hooks/postdeploy.sh reads from azd's environment (tests/infra.rs checks it):
// without them `azd up` of the sample would subscribe nothing, and the healer would run on a
// silent fleet.
output FUNCTION_APP_NAME string = healer.outputs.FUNCTION_APP_NAME
output HEARTBEAT_TOPIC_ENDPOINT string = healer.outputs.HEARTBEAT_TOPIC_ENDPOINT
output HEARTBEAT_TOPIC_NAME string = healer.outputs.HEARTBEAT_TOPIC_NAME
output STORAGE_ACCOUNT_NAME string = healer.outputs.STORAGE_ACCOUNT_NAME
output SYSTEM_TOPICS array = healer.outputs.SYSTEM_TOPICS
