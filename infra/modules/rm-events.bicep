// The Resource Manager system topic of one watched resource group (deployed into it). Its
// subscription to monitor-events is created after the code is deployed (subscriptions.bicep).
param name string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: 'global'
  identity: { type: 'SystemAssigned' }
  properties: {
    source: resourceGroup().id
    topicType: 'Microsoft.Resources.ResourceGroups'
  }
}

output systemTopicName string = systemTopic.name
output principalId string = systemTopic.identity.principalId
